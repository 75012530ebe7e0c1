"""A small ViT trained on the built-in digits (model/digits.py): `edgeformer train --task digits`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeformer.model.checkpoint import save_checkpoint
from edgeformer.model.digits import digits
from edgeformer.model.vit import ViT, ViTConfig
from edgeformer.runtime.classifier import preprocess

# The shipped digits model (model/weights/digits): 16 patches of 2x2 pixels, 4 blocks of width 64.
DIGITS_CONFIG = ViTConfig(image_size=8, patch_size=2, channels=1, num_classes=10, d_model=64, n_heads=4, n_layers=4,
                          d_ff=128, dropout=0.1, layer_norm_eps=1e-6, labels=tuple(str(i) for i in range(10)),
                          mean=(0.5,), std=(0.5,))


@dataclass(frozen=True)
class DigitsTraining:
    steps: int = 3500
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0


def accuracy(model: ViT, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(preprocess(images, model.config))).argmax(-1).numpy() == labels).mean())


def train_digits(out: Path, training: DigitsTraining = DigitsTraining(), config: ViTConfig = DIGITS_CONFIG,
                 force: bool = False, progress: bool = True) -> dict[str, float]:
    """Train on the train split (random shifts of a pixel, label smoothing, one-cycle AdamW), save the checkpoint;
    the test split's accuracy."""
    from tqdm import tqdm

    torch.manual_seed(training.seed)
    model = ViT(config)
    train_x, train_y = digits("train")
    pixels, labels = torch.from_numpy(preprocess(train_x, config)), torch.from_numpy(train_y)
    opt = torch.optim.AdamW(model.parameters(), lr=training.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=training.lr, total_steps=training.steps,
                                                   pct_start=0.1)
    rng = torch.Generator().manual_seed(training.seed)
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(training.steps), desc="training", unit="step", disable=not progress):
        index = torch.randint(0, len(pixels), (training.batch,), generator=rng)
        shift = torch.randint(-1, 2, (2,), generator=rng).tolist()  # a pixel up or down, left or right
        batch = torch.roll(pixels[index], shifts=(shift[0], shift[1]), dims=(2, 3))
        loss = F.cross_entropy(model(batch), labels[index], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    seconds = time.perf_counter() - start
    test_x, test_y = digits("test")
    save_checkpoint(model, out, force=force)  # type: ignore[arg-type]
    return {"accuracy": accuracy(model, test_x, test_y), "train_seconds": seconds,
            "parameters": sum(p.numel() for p in model.parameters())}
