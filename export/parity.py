"""Parity of exported graphs with the PyTorch model, checked before a bundle is written.

Each case encodes a batch of random sources of mixed lengths in both systems, compares the cross-attention
caches, then decodes step by step with the KV cache, comparing the logits at every step; both systems are fed
PyTorch's greedy tokens, so a step's argmax agreeing in both means greedy decoding gives the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edgeformer.model.generate import pad_batch
from edgeformer.model.transformer import Transformer
from edgeformer.runtime.spec import DECODER, ENCODER, GraphSpec, past_for


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float  # relative to the largest |logit| of the step: logits of large models span a wide range

    def allowed(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(reference).max())


TOLERANCES = {"fp32": Tolerance(atol=1e-4, rtol=1e-5), "fp32-optimized": Tolerance(atol=1e-4, rtol=1e-5)}
# (source lengths of one batch, decoding steps): batch 1 with a one-token source, then a padded mixed batch.
PARITY_CASES: tuple[tuple[tuple[int, ...], int], ...] = (((1,), 6), ((7, 2, 5), 8), ((16, 16), 6))


class ParityError(RuntimeError):
    """An exported graph whose outputs differ from PyTorch's by more than the tolerance."""


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check(diff: float, allowed: float, what: str) -> None:
    if not diff <= allowed:  # also catches NaN
        raise ParityError(f"{what}: max |difference| to PyTorch {diff:.3g} exceeds the allowed {allowed:.3g}")


@torch.no_grad()
def compare_case(model: Transformer, encoder: ort.InferenceSession, decoder: ort.InferenceSession,
                 specs: dict[str, GraphSpec], src: Sequence[Sequence[int]], steps: int,
                 tolerance: Tolerance) -> dict[str, float]:
    """One batch through both systems; raises ParityError on the first output out of tolerance."""
    cfg = model.config
    where = f"batch of {len(src)} with source lengths {[len(s) for s in src]}"
    ids, mask = pad_batch([list(s) for s in src], cfg.pad_id)
    cross = model.decoder.cross_kv(model.encoder(ids, mask))
    enc_out = dict(zip(specs[ENCODER].output_names, encoder.run(None, {"input_ids": ids.numpy(),
                                                                     "attention_mask": mask.numpy()}), strict=True))
    torch_cross = [t.numpy() for kv in cross for t in kv]
    enc_diff = 0.0
    for (name, got), want in zip(enc_out.items(), torch_cross, strict=True):
        diff = float(np.abs(got - want).max())
        _check(diff, tolerance.allowed(want), f"encoder graph, output {name}, {where}")
        enc_diff = max(enc_diff, diff)

    feed: dict[str, np.ndarray] = {"encoder_attention_mask": mask.numpy()}
    feed.update({past_for(name): value for name, value in enc_out.items()})
    past = model.decoder.empty_past(len(src))
    for t in specs[DECODER].inputs:
        if t.name.startswith("past_key_values.") and t.name.endswith((".decoder.key", ".decoder.value")):
            feed[t.name] = np.zeros((len(src), cfg.n_heads, 0, cfg.head_dim), np.float32)
    tokens = torch.full((len(src), 1), cfg.bos_id, dtype=torch.long)
    dec_diff, agree = 0.0, 0
    for step in range(steps):
        logits, past = model.decoder(tokens, mask, cross, past)
        feed["input_ids"] = tokens.numpy()
        outputs = dict(zip(specs[DECODER].output_names, decoder.run(None, feed), strict=True))
        want = logits.numpy()
        diff = float(np.abs(outputs["logits"] - want).max())
        _check(diff, tolerance.allowed(want), f"decoder graph, output logits, step {step}, {where}")
        dec_diff = max(dec_diff, diff)
        agree += int((outputs["logits"][:, -1].argmax(-1) == want[:, -1].argmax(-1)).sum())
        for name, value in outputs.items():
            if name != "logits":
                feed[past_for(name)] = value
        tokens = logits[:, -1:].argmax(-1)
    return {"encoder": enc_diff, "decoder": dec_diff, "agree": agree, "tokens": steps * len(src)}


def check_bundle(model: Transformer, folder: Path, specs: dict[str, GraphSpec], files: dict[str, str],
                 variant: str = "fp32") -> dict:
    """Run every parity case; return the figures that go into the manifest."""
    tolerance = TOLERANCES[variant]
    encoder, decoder = cpu_session(Path(folder) / files[ENCODER]), cpu_session(Path(folder) / files[DECODER])
    rng = np.random.default_rng(0)
    worst = {ENCODER: 0.0, DECODER: 0.0}
    agree = tokens = 0
    for lengths, steps in PARITY_CASES:
        src = [rng.integers(4, model.config.src_vocab_size, n).tolist() for n in lengths]
        r = compare_case(model, encoder, decoder, specs, src, steps, tolerance)
        worst = {g: max(worst[g], r[g]) for g in worst}
        agree += int(r["agree"])
        tokens += int(r["tokens"])
    if agree != tokens:
        raise ParityError(f"decoder graph: greedy tokens differ from PyTorch's at {tokens - agree} of {tokens} steps")
    return {"reference": "pytorch", "provider": "CPUExecutionProvider",
            "max_abs_diff": {ENCODER: worst[ENCODER], DECODER: worst[DECODER]},
            "greedy_token_agreement": agree / tokens, "tokens_compared": tokens,
            "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol},
            "cases": [{"source_lengths": list(lengths), "steps": steps} for lengths, steps in PARITY_CASES]}
