"""Write a Transformer-base sized checkpoint with random weights, to export and benchmark at the reference size.

    .venv/bin/python benchmarks/base_checkpoint.py checkpoints/base
    .venv/bin/edgeformer export checkpoints/base bundles/base && .venv/bin/edgeformer info bundles/base
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from edgeformer.model.checkpoint import save_checkpoint
from edgeformer.model.config import BASE_SIZE, TransformerConfig
from edgeformer.model.transformer import Transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = Transformer(TransformerConfig(**BASE_SIZE))
    save_checkpoint(model, args.out, force=args.force)
    print(f"{args.out}: {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
