"""The Vision Transformer (Dosovitskiy et al., 2020, "An Image is Worth 16x16 Words"): the Transformer's encoder
fed image patches. Its blocks are our encoder's (`EncoderLayer`, pre-norm, GELU); what is its own is the patch
embedding, the class token, the learned positions and the classification head.

Shapes: B batch, C channels, H x W image, P patches ((H/p) * (W/p) for patch size p), D d_model, K classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from edgeformer.model.config import ConfigError, TransformerConfig
from edgeformer.model.transformer import EncoderLayer


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    num_classes: int = 1000
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    d_ff: int = 3072
    dropout: float = 0.0
    layer_norm_eps: float = 1e-12  # Hugging Face ViT's
    labels: tuple[str, ...] = ()  # class names, index by index; none: the indices
    # Preprocessing, which the bundle carries so that a runtime needs nothing else: pixels in [0, 255] times
    # `rescale`, then (x - mean) / std per channel, channels first. Images come at image_size x image_size.
    rescale: float = 1 / 255
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        problems = [f"{n} must be a positive integer, got {getattr(self, n)!r}" for n in (
            "image_size", "patch_size", "channels", "num_classes", "d_model", "n_heads", "n_layers", "d_ff")
            if not isinstance(getattr(self, n), int) or getattr(self, n) < 1]
        if not problems and self.image_size % self.patch_size:
            problems.append(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if not problems and self.d_model % self.n_heads:
            problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.labels and len(self.labels) != self.num_classes:
            problems.append(f"{len(self.labels)} labels for {self.num_classes} classes")
        if len(self.mean) != self.channels or len(self.std) != self.channels or not all(s > 0 for s in self.std):
            problems.append(f"mean and std need one value per channel ({self.channels}), std above 0")
        if problems:
            raise ConfigError("invalid ViTConfig: " + "; ".join(problems))
        for name in ("labels", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def blocks(self) -> TransformerConfig:
        """The encoder blocks' description, in our Transformer's terms: pre-norm, GELU, no embeddings of words."""
        return TransformerConfig(src_vocab_size=1, tgt_vocab_size=1, d_model=self.d_model, n_heads=self.n_heads,
                                 n_encoder_layers=self.n_layers, n_decoder_layers=1, d_ff=self.d_ff,
                                 dropout=self.dropout, activation="gelu", norm="pre",
                                 layer_norm_eps=self.layer_norm_eps, pad_id=0, bos_id=0, eos_id=0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), **{n: list(getattr(self, n)) for n in ("labels", "mean", "std")}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown ViTConfig fields {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:  # a value of the wrong kind
            raise ConfigError(f"invalid ViTConfig: {e}") from None


class PatchEmbedding(nn.Module):
    """Non-overlapping p x p patches, each projected to D: a convolution of stride p."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.channels, config.d_model, config.patch_size, stride=config.patch_size)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, P, D)


class ViT(nn.Module):
    family = "vit"

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        blocks = config.blocks()
        self.patch_embed = PatchEmbedding(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.positions = nn.Parameter(torch.zeros(1, config.patches + 1, config.d_model))  # the class token's first
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(blocks) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.d_model, config.num_classes)
        nn.init.trunc_normal_(self.positions, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (B, C, H, W), preprocessed -> logits (B, K)."""
        x = self.patch_embed(pixels)  # (B, P, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.positions  # (B, 1+P, D)
        x = self.dropout(x)
        bias = x.new_zeros(1, 1, 1, x.shape[1])  # every patch sees every other
        for layer in self.layers:
            x = layer(x, bias)
        return self.head(self.norm(x[:, 0]))  # the class token's state -> (B, K)
