"""Training on a built-in task: `edgeformer train --task dates`."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from edgeformer.model import metrics
from edgeformer.model.checkpoint import save_checkpoint
from edgeformer.model.config import TransformerConfig
from edgeformer.model.generate import generate, pad_batch
from edgeformer.model.tasks import get_task
from edgeformer.model.transformer import Transformer
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.tokenizer import BOS_ID, EOS_ID, PAD_ID, CharTokenizer, CharVocab

# The shipped model: small enough to train in minutes on 2 cores and to ship in the package (about 2.5 MB).
DEMO_MODEL = {"d_model": 128, "n_heads": 4, "n_encoder_layers": 2, "n_decoder_layers": 2, "d_ff": 256,
              "dropout": 0.1}


@dataclass(frozen=True)
class TrainConfig:
    task: str = "dates"
    steps: int = 2500
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 200
    label_smoothing: float = 0.1
    eval_size: int = 2000
    seed: int = 0


def exact_match(model: Transformer, tokenizer: CharTokenizer, pairs: list[tuple[str, str]],
                batch_size: int = 250) -> float:
    """Fraction of held-out pairs whose greedy output equals the target exactly."""
    gen = GenerationConfig(max_new_tokens=16)
    outputs = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i: i + batch_size]
        hyps = generate(model, tokenizer.encode_batch([s for s, _ in chunk]), gen)
        outputs += [tokenizer.target.decode(h[0].tokens) for h in hyps]
    return metrics.exact_match(outputs, [t for _, t in pairs]) / 100


def _batch(tokenizer: CharTokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, ...]:
    src, src_mask = pad_batch(tokenizer.encode_batch([s for s, _ in pairs]), PAD_ID)
    targets = [tokenizer.target.encode(t, add_eos=False) for _, t in pairs]
    dec_in, _ = pad_batch([[BOS_ID, *t] for t in targets], PAD_ID)
    labels, _ = pad_batch([[*t, EOS_ID] for t in targets], PAD_ID)
    return src, src_mask, dec_in, labels


def train(out: Path, train_config: TrainConfig | None = None, model_overrides: dict | None = None,
          force: bool = False, progress: bool = True) -> dict[str, float]:
    """Train a model on a built-in task, evaluate it on the held-out split and save a checkpoint at `out`."""
    tc = train_config or TrainConfig()
    task = get_task(tc.task)
    source_chars, target_chars = task.alphabet()
    tokenizer = CharTokenizer(CharVocab(source_chars), CharVocab(target_chars))
    config = TransformerConfig(src_vocab_size=len(tokenizer.source), tgt_vocab_size=len(tokenizer.target),
                               pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, **{**DEMO_MODEL, **(model_overrides or {})})
    torch.manual_seed(tc.seed)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to a tenth
        if step < tc.warmup:
            return (step + 1) / tc.warmup
        progress_ = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = random.Random(f"train-{tc.seed}")
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(tc.steps), desc=f"train {tc.task}", disable=not progress, unit="step")
    for step in bar:
        src, src_mask, dec_in, labels = _batch(tokenizer, [task.sample(rng, "train") for _ in range(tc.batch_size)])
        logits = model(src, dec_in, src_mask)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=PAD_ID,
                               label_smoothing=tc.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - start
    model.eval()
    accuracy = exact_match(model, tokenizer, task.pairs(tc.eval_size, "test"))
    save_checkpoint(model, out, tokenizer, force=force, task=tc.task)
    return {"exact_match": accuracy, "train_seconds": train_seconds, "parameters": model.num_parameters(),
            "checkpoint_bytes": sum(f.stat().st_size for f in Path(out).iterdir())}
