"""The runtime against PyTorch: token for token on padded batches, greedy, beam and seeded sampling, on every kind of
tiny model and on the shipped one."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest

from edgeformer.model.checkpoint import default_checkpoint
from edgeformer.model.config import BASE_SIZE, TransformerConfig
from edgeformer.model.generate import generate
from edgeformer.model.tasks import get_task
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.search import pad, top_k
from edgeformer.runtime.session import SMALL_STEP_WEIGHTS, Runtime, step_weights
from tests.helpers import VARIANTS, random_sources, tiny_model

GREEDY = GenerationConfig(max_new_tokens=12)
BEAM = GenerationConfig(strategy="beam", num_beams=4, num_return_sequences=2, max_new_tokens=12)


@pytest.mark.parametrize("variant", ["post-sinusoidal", "pre-learned-gelu", "shared-untied", "marian-like"])
@pytest.mark.parametrize("gen", [GREEDY, BEAM], ids=["greedy", "beam"])
def test_runtime_equals_pytorch_token_for_token_on_padded_batches(exported, variant: str,
                                                                  gen: GenerationConfig) -> None:
    model, bundle = exported(variant)
    rt = Runtime(bundle)
    src = random_sources(120, model.config.src_vocab_size, seed=1)
    for i in range(0, len(src), 24):  # padded batches of 24 mixed lengths
        ours, ref = rt.generate(src[i: i + 24], gen), generate(model, src[i: i + 24], gen)
        assert [[h.tokens for h in hs] for hs in ours] == [[h.tokens for h in hs] for hs in ref]
        for hs_ours, hs_ref in zip(ours, ref, strict=True):
            assert [h.score for h in hs_ours] == pytest.approx([h.score for h in hs_ref], abs=1e-3)


def test_shipped_model_accuracy_through_the_runtime_equals_pytorch(exported) -> None:
    model, bundle = exported("demo")
    rt = Runtime(bundle)
    assert rt.tokenizer is not None
    pairs = get_task("dates").pairs(300, "test", seed=5)
    src = rt.tokenizer.encode_batch([s for s, _ in pairs])
    ours = [rt.tokenizer.target.decode(h[0].tokens) for h in rt.generate(src)]
    ref = [rt.tokenizer.target.decode(h[0].tokens) for h in generate(model, src)]
    assert ours == ref
    assert sum(o == t for o, (_, t) in zip(ours, pairs, strict=True)) / len(pairs) >= 0.99


def test_text_in_text_out(exported) -> None:
    _, bundle = exported("demo")
    assert Runtime(bundle).translate(["5 mars 1998", "Thursday, July 4, 2024"]) == ["1998-03-05", "2024-07-04"]


def test_seeded_sampling_matches_pytorch(exported) -> None:
    model, bundle = exported("post-sinusoidal")
    gen = GenerationConfig(strategy="sample", seed=9, temperature=1.3, top_p=0.9, max_new_tokens=10)
    src = random_sources(10, 37, seed=2)
    assert ([h[0].tokens for h in Runtime(bundle).generate(src, gen)]
            == [h[0].tokens for h in generate(model, src, gen)])


def test_the_shipped_models_steps_count_as_small_and_transformer_bases_do_not() -> None:
    shipped = json.loads((default_checkpoint() / "config.json").read_text())
    base = TransformerConfig(**BASE_SIZE).to_dict()
    assert step_weights(base) == 6 * (6 * 512 * 512 + 2 * 512 * 2048) + 512 * 32000
    assert step_weights(shipped) < SMALL_STEP_WEIGHTS < step_weights(base)
    assert 6 * step_weights(shipped) < SMALL_STEP_WEIGHTS < 7 * step_weights(shipped)  # up to batch 6 (README)


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="no CUDA: onnxruntime-gpu with a CUDA GPU is needed for the CUDA parity test")
def test_cuda_runtime_equals_pytorch(exported) -> None:
    model, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle, providers=["cuda"])
    assert rt.provider == "CUDAExecutionProvider"
    src = random_sources(48, 37, seed=3)
    for gen in (GREEDY, BEAM):
        assert ([[h.tokens for h in hs] for hs in rt.generate(src, gen)]
                == [[h.tokens for h in hs] for hs in generate(model, src, gen)])


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_suppressed_tokens_never_appear_and_forced_eos_ends_on_the_last_step(exported, strategy: str) -> None:
    model, bundle = exported("post-sinusoidal")
    rt = Runtime(bundle)
    src = random_sources(12, model.config.src_vocab_size, seed=3)
    free = rt.generate(src, GenerationConfig(strategy=strategy, max_new_tokens=8, ignore_eos=True))
    common = Counter(t for hs in free for t in hs[0].tokens).most_common(1)[0][0]
    gen = GenerationConfig(strategy=strategy, max_new_tokens=8, suppress_tokens=(common,))
    suppressed = rt.generate(src, gen)
    assert all(common not in hs[0].tokens for hs in suppressed)
    assert [[h.tokens for h in hs] for hs in suppressed] == [[h.tokens for h in hs] for hs in generate(model, src, gen)]
    forced = rt.generate(src, GenerationConfig(strategy=strategy, max_new_tokens=4, forced_eos=True))
    assert all(len(h.tokens) <= 3 for hs in forced for h in hs)  # the 4th token can only be EOS


@pytest.mark.parametrize("gen", [
    GenerationConfig(max_new_tokens=8, min_new_tokens=5),
    GenerationConfig(strategy="beam", num_beams=4, num_return_sequences=2, length_penalty=0.6, min_new_tokens=3,
                     max_new_tokens=10),
    GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=5, forced_eos=True, early_stopping=False),
    GenerationConfig(strategy="beam", num_beams=5, max_new_tokens=6, ignore_eos=True, suppress_tokens=(4, 7)),
], ids=["greedy-min-length", "beam-penalty-n-best", "beam-forced-eos", "beam-ignore-eos-suppressed"])
def test_searches_through_the_graphs_head_equal_pytorch_in_tokens_and_scores(exported, gen: GenerationConfig) -> None:
    """The runtime takes each step's k best from its decoder graph's search head; PyTorch from its log-softmax.
    Same rules (min length, forced EOS, suppressed tokens), same hypotheses, scores within 1e-4."""
    model, bundle = exported("post-sinusoidal")
    src = random_sources(10, model.config.src_vocab_size, seed=11)
    ours, ref = Runtime(bundle).generate(src, gen), generate(model, src, gen)
    assert [[h.tokens for h in hs] for hs in ours] == [[h.tokens for h in hs] for hs in ref]
    assert max(abs(a.score - b.score) for x, y in zip(ours, ref, strict=True) for a, b in zip(x, y, strict=True)) < 1e-4


def test_the_search_head_gives_the_k_best_of_the_log_probabilities(exported) -> None:
    model, bundle = exported("pre-learned-gelu")
    rt = Runtime(bundle)
    ids, mask = pad(random_sources(6, model.config.src_vocab_size, seed=2), model.config.pad_id)
    head, full = rt.step_model(ids, mask, 1), rt.step_model(ids, mask, 1)
    tokens = np.full(len(ids), model.config.bos_id, dtype=np.int64)
    rules = np.zeros(rt.config["tgt_vocab_size"], np.float32)
    rules[[3, 9]] = -np.inf
    for _ in range(4):
        values, best = head.top(tokens, 5, rules)
        want_values, want = top_k(full.log_probs(tokens) + rules, 5)
        assert np.array_equal(best, want) and np.abs(values - want_values).max() < 1e-5
        assert not np.isin(best, [3, 9]).any()
        tokens = best[:, 0]


@pytest.fixture(scope="module")
def early_ending(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tiny model whose outputs end at many different lengths: EOS gets a logit bias."""
    import torch

    from edgeformer.export.onnx_export import export
    from edgeformer.model.checkpoint import save_checkpoint

    model = tiny_model(seed=5, **VARIANTS["marian-like"])  # type: ignore[arg-type]
    with torch.no_grad():
        model.decoder.output_bias[model.config.eos_id] += 8.5
    root = tmp_path_factory.mktemp("early")
    save_checkpoint(model, root / "checkpoint")
    export(root / "checkpoint", root / "bundle")
    return model, root / "bundle"


@pytest.mark.parametrize("gen", [GenerationConfig(max_new_tokens=30),
                                 GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=30),
                                 GenerationConfig(strategy="sample", num_return_sequences=2, seed=1,
                                                  max_new_tokens=30)],
                         ids=["greedy", "beam", "sample"])
def test_inputs_that_ended_leave_the_batch_and_change_no_result(early_ending, monkeypatch, gen) -> None:
    import edgeformer.runtime.search as search
    import edgeformer.runtime.session as session

    model, bundle = early_ending
    rt = Runtime(bundle, threads=1)
    src = random_sources(16, model.config.src_vocab_size, seed=21)
    rows_seen: list[int] = []
    groups: list[int] = []  # rows per source sharing its cross-attention cache, after each reorder
    reorder = session._Steps.reorder

    def spy(self, rows):  # type: ignore[no-untyped-def]
        rows_seen.append(len(rows))
        reorder(self, rows)
        groups.append(self.group)

    monkeypatch.setattr(session._Steps, "reorder", spy)
    leaving = rt.generate(src, gen)
    lengths = {len(h.tokens) for hs in leaving for h in hs}
    assert len(lengths) >= 3, f"the outputs should end at several lengths, not {lengths}"
    rows = len(src) * (gen.num_beams if gen.strategy == "beam" else gen.num_return_sequences)
    assert rows_seen and min(rows_seen) < rows, "rows that ended should have left the batch"
    if gen.strategy == "beam":  # whole inputs leave: their beams keep sharing the cache
        assert set(groups) == {gen.num_beams}
    elif gen.num_return_sequences > 1:  # a source's samples end apart: its cache is copied to the rows left
        assert 1 in groups
    assert [[h.tokens for h in hs] for hs in leaving] == [[h.tokens for h in hs] for hs in generate(model, src, gen)]
    monkeypatch.setattr(search, "leaving", lambda live: None)  # a sample's draws are its row's, whoever left
    staying = rt.generate(src, gen)
    # the same tokens; the scores within 1e-4 (a source's rows read its keys as one query or apart once others left)
    assert [[h.tokens for h in hs] for hs in leaving] == [[h.tokens for h in hs] for hs in staying]
    assert max(abs(a.score - b.score) for x, y in zip(leaving, staying, strict=True)
               for a, b in zip(x, y, strict=True)) < 1e-4
