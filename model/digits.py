"""The built-in image task, digits: scikit-learn's 1,797 handwritten digits (8x8, one channel, shipped inside its
package, no download), split 80/20 stratified. No torch here: the transforms judge variants on these images."""

from __future__ import annotations

import numpy as np


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8, 1) uint8 in [0, 255], labels (N,)) of the train or test split (80/20, stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"digits has a train and a test split, not {split!r}")
    data = load_digits()
    images = np.round(data.images * (255 / 16)).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    train_x, test_x, train_y, test_y = train_test_split(images, data.target, test_size=0.2, random_state=0,
                                                        stratify=data.target)
    return (train_x, train_y) if split == "train" else (test_x, test_y)
