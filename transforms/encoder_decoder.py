"""The encoder-decoder family's variants, measured: what they are judged on (export/evaluation.py: the user's
file, the recorded task, or random ids), the source and the variant decoding side by side, and the inputs that
static quantization calibrates on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeformer.export.evaluation import EvalSet, eval_set
from edgeformer.runtime.bundle import Manifest
from edgeformer.runtime.encoder_decoder import DECODER, ENCODER
from edgeformer.runtime.search import pad
from edgeformer.runtime.session import Runtime
from edgeformer.runtime.tokenizer import load_tokenizer
from edgeformer.transforms.judge import on_provider


def inputs(source: Manifest, bundle: Path, path: Path | str | None, n: int, metric: str | None = None,
           split: str = "test", seed: int = 0) -> EvalSet:
    """What to judge (or calibrate) the variants of `bundle` on."""
    tokenizer = load_tokenizer(bundle, source.files) if source.tokenizer else None
    return eval_set(source.config, tokenizer, source.task, path, n, split=split, metric=metric, seed=seed)


def judge(source: Path, candidate: Path, inputs: EvalSet, provider: str = "cpu", steps: int = 16) -> dict:
    """The candidate bundle against the bundle it came from, both fed the source's greedy tokens."""
    # both verified already: the source as derive loaded it, the candidate as it was just written
    ref = Runtime(source, threads=2, verify=False)
    new, placed = on_provider(lambda providers: Runtime(candidate, providers=providers, threads=2, verify=False),
                              provider)
    # the bundle's own settings, greedy, within what learned positions allow
    gen = ref.generation_config(strategy="greedy", num_return_sequences=1, max_new_tokens=min(
        ref.generation.max_new_tokens, ref.manifest.max_positions or ref.generation.max_new_tokens))
    ref.check_inputs(inputs.sources, gen)
    worst, agree, total = 0.0, 0, 0
    for i in range(0, len(inputs.sources), 50):
        chunk = inputs.sources[i: i + 50]
        ids, mask = pad(chunk, int(ref.config["pad_id"]))
        a, b = ref.step_model(ids, mask, 1, steps), new.step_model(ids, mask, 1, steps)
        tokens = np.full(len(chunk), int(ref.config["bos_id"]), dtype=np.int64)
        for _ in range(steps):
            la, lb = a.log_probs(tokens), b.log_probs(tokens)
            worst = max(worst, float(np.abs(la - lb).max()))
            agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
            total += len(chunk)
            tokens = la.argmax(-1)
    figures: dict = {"against": f"{ref.manifest.variant} bundle", "provider": new.provider, **placed,
                     "inputs": len(inputs.sources), "judged_on": inputs.judged_on,
                     "max_abs_logprob_diff": worst, "greedy_token_agreement": agree / total}
    if inputs.metric is not None:
        figures["metric"] = inputs.metric
        figures["metric_source"] = inputs.score(ref.generate(inputs.sources, gen), ref.tokenizer)
        figures["metric_variant"] = inputs.score(new.generate(inputs.sources, gen), new.tokenizer)
    return figures


def calibration_feeds(bundle: Path, inputs: EvalSet, steps: int = 12) -> dict[str, list[dict]]:
    """Inputs to calibrate activation ranges on, per graph, captured by decoding `inputs` with the source bundle."""
    rt = Runtime(bundle, threads=2, verify=False)  # derive verifies the bundle
    feeds: dict[str, list[dict]] = {ENCODER: [], DECODER: []}
    for i in range(0, len(inputs.sources), 16):
        ids, mask = pad(inputs.sources[i: i + 16], int(rt.config["pad_id"]))
        feeds[ENCODER].append({"input_ids": ids, "attention_mask": mask})
        state = rt.step_model(ids, mask, 1, steps)
        tokens = np.full(len(ids), int(rt.config["bos_id"]), dtype=np.int64)
        for _ in range(steps):
            feeds[DECODER].append({"input_ids": tokens[:, None], **state.inputs()})
            tokens = state.log_probs(tokens).argmax(-1)
    return feeds
