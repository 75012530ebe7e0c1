"""Search rules (runtime/search.py) driven by the PyTorch model: EOS, length limits, beams, sampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgeformer.model.generate import generate
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.search import StepModel, in_place, search
from tests.helpers import tiny_model

SRC = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


class TableSteps(StepModel):
    """A step model whose next-token distribution depends only on the last token: a tiny Markov chain."""

    def __init__(self, table: np.ndarray, rows: int) -> None:
        self.table, self.last = table, np.zeros(rows, dtype=np.int64)
        self.vocab = table.shape[-1]

    def log_probs(self, tokens: np.ndarray) -> np.ndarray:
        self.last = tokens
        return self.table[tokens].copy()

    def reorder(self, rows: np.ndarray) -> None:
        self.last = self.last[rows]


def markov(vocab: int = 5, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(vocab, vocab)) * 2
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_greedy_stops_at_eos_and_respects_max_new_tokens() -> None:
    model = tiny_model()
    eos = model.config.eos_id
    with np.errstate(all="ignore"):
        for h in generate(model, SRC, GenerationConfig(max_new_tokens=5)):
            assert len(h[0].tokens) <= 5 and eos not in h[0].tokens


def test_min_new_tokens_forbids_an_early_eos() -> None:
    table = markov()
    table[:, 2] = 0.0  # EOS (id 2) is by far the likeliest next token everywhere
    gen = GenerationConfig(max_new_tokens=6, min_new_tokens=4)
    out = search(lambda rows: TableSteps(table, rows), 2, gen, bos_id=1, eos_id=2, pad_id=0)
    assert all(len(h[0].tokens) == 4 for h in out)
    out = search(lambda rows: TableSteps(table, rows), 2, GenerationConfig(max_new_tokens=6), 1, 2, 0)
    assert all(len(h[0].tokens) == 0 for h in out)


def test_ignore_eos_forces_the_full_length() -> None:
    table = markov()
    table[:, 2] = 0.0
    gen = GenerationConfig(max_new_tokens=7, ignore_eos=True)
    out = search(lambda rows: TableSteps(table, rows), 1, gen, 1, 2, 0)
    assert len(out[0][0].tokens) == 7


def test_beam_search_finds_the_best_sequence_that_brute_force_finds() -> None:
    table = markov(vocab=5, seed=3)
    length = 4
    best = max(itertools.product(range(3, 5), repeat=length),  # all sequences avoiding EOS, PAD, BOS
               key=lambda seq: sum(table[a, b] for a, b in zip((1, *seq[:-1]), seq, strict=True)))
    # With EOS forbidden until the end and beams as wide as the space, beam search is exhaustive.
    table_no_special = table.copy()
    table_no_special[:, :3] = -np.inf
    gen = GenerationConfig(strategy="beam", num_beams=16, max_new_tokens=length, length_penalty=0.0)
    out = search(lambda rows: TableSteps(table_no_special, rows), 1, gen, 1, 2, 0)
    assert tuple(out[0][0].tokens) == best


def test_beam_returns_n_best_sorted_by_score() -> None:
    model = tiny_model()
    out = generate(model, SRC, GenerationConfig(strategy="beam", num_beams=4, num_return_sequences=3,
                                                max_new_tokens=8))
    for hyps in out:
        assert len(hyps) == 3
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def test_beam_of_one_equals_greedy() -> None:
    model = tiny_model()
    greedy = generate(model, SRC, GenerationConfig(max_new_tokens=8))
    beam = generate(model, SRC, GenerationConfig(strategy="beam", num_beams=1, max_new_tokens=8))
    assert [g[0].tokens for g in greedy] == [b[0].tokens for b in beam]


def test_sampling_is_reproducible_with_a_seed_and_varies_without() -> None:
    model = tiny_model()
    gen = GenerationConfig(strategy="sample", seed=11, max_new_tokens=10, temperature=2.0,
                           num_return_sequences=2)
    a, b = generate(model, SRC, gen), generate(model, SRC, gen)
    assert [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b]
    c = generate(model, SRC, GenerationConfig(strategy="sample", seed=12, max_new_tokens=10, temperature=2.0,
                                              num_return_sequences=2))
    assert [[h.tokens for h in x] for x in a] != [[h.tokens for h in x] for x in c]


def test_top_k_one_sampling_is_greedy() -> None:
    model = tiny_model()
    greedy = generate(model, SRC, GenerationConfig(max_new_tokens=8))
    sampled = generate(model, SRC, GenerationConfig(strategy="sample", top_k=1, seed=0, max_new_tokens=8))
    assert [g[0].tokens for g in greedy] == [s[0].tokens for s in sampled]


def test_top_p_keeps_only_the_nucleus() -> None:
    table = np.log(np.array([[0.6, 0.3, 0.05, 0.05]] * 4))
    seen = set()
    for seed in range(40):
        out = search(lambda rows: TableSteps(table, rows), 1,
                     GenerationConfig(strategy="sample", top_p=0.8, seed=seed, max_new_tokens=1, ignore_eos=True),
                     bos_id=3, eos_id=2, pad_id=0)
        seen.add(out[0][0].tokens[0])
    assert seen == {0, 1}  # 0.6 + 0.3 reach 0.8; the tail is never drawn


def test_mixed_length_batch_equals_each_input_alone() -> None:
    model = tiny_model()
    gen = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=8)
    batch = generate(model, SRC, gen)
    for src, hyps in zip(SRC, batch, strict=True):
        assert generate(model, [src], gen)[0][0].tokens == hyps[0].tokens


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"strategy": "beam", "num_beams": 0}, "num_beams must be >= 1"),
    ({"strategy": "beam", "num_beams": 2, "num_return_sequences": 3}, "cannot exceed"),
    ({"strategy": "nucleus"}, "unknown strategy"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_p": 1.5}, "top_p must be in"),
])
def test_bad_generation_settings_fail_clearly(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)


def test_a_beams_first_child_stays_on_its_row_and_where_beams_sit_changes_no_result(monkeypatch) -> None:
    import edgeformer.runtime.search as search_module

    # row 5 has two children: the first stays on row 5, the second takes row 7, whose beam ended; row 4 keeps 4
    assert in_place([(5, 1, -1.0), (4, 2, -2.0), (5, 3, -3.0), (6, 4, -4.0)], 4) == \
        [(4, 2, -2.0), (5, 1, -1.0), (6, 4, -4.0), (5, 3, -3.0)]
    model = tiny_model(seed=3)
    src = [[4 + (i * 7 + j) % 30 for j in range(3 + i % 5)] for i in range(8)]
    gen = GenerationConfig(strategy="beam", num_beams=4, num_return_sequences=3, max_new_tokens=12)
    placed = generate(model, src, gen)
    monkeypatch.setattr(search_module, "in_place", lambda chosen, first: chosen)  # beams in rank order, as before
    ranked = generate(model, src, gen)
    assert [[h.tokens for h in hs] for hs in placed] == [[h.tokens for h in hs] for hs in ranked]
    assert max(abs(a.score - b.score) for x, y in zip(placed, ranked, strict=True)
               for a, b in zip(x, y, strict=True)) < 1e-5
