"""Greedy, beam and sampled search in numpy, over any step model that returns next-token log-probabilities, or
the k best of them (`StepModel.top`: the runtime's decoder graph computes them itself).

Both the runtime and the PyTorch reference (model/generate.py) run this one search, with Hugging Face's rules: the
same EOS and length handling, the same beam bookkeeping and length penalty, so that their outputs can be compared
token for token and what differs is the numerics of the graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Protocol

import numpy as np

from edgeformer.runtime.options import GenerationConfig, Hypothesis


class StepModel(Protocol):
    vocab: int  # the size of the target vocabulary
    leaves: bool = True  # rows can leave (reorder to fewer rows) cheaply: on the host

    def log_probs(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (rows,) -> log-probabilities of the next token (rows, V); the cache grows by one."""
        ...

    def reorder(self, rows: np.ndarray) -> None:
        """Keep the cache rows `rows`, in that order: a permutation (beam search), or fewer rows than there are,
        when rows that ended leave (then what is fixed per row, such as the source's mask, follows)."""
        ...

    def top(self, tokens: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens (rows,) -> the k best next tokens of each row, once `mask` (V,) is added to the log-probabilities:
        (log-probabilities (rows, k), ids (rows, k)), best first, ties to the lower id; the cache grows by one.
        Step models that can do it where the logits are (the runtime's decoder graph) override this."""
        return top_k(self.log_probs(tokens) + mask, k)


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values of each row of x and their indices, largest first, ties to the lower index (as
    onnxruntime's TopK orders them, at the k-th value too)."""
    if k == 1:
        ids = x.argmax(-1)[:, None]
    elif k < x.shape[-1] and (found := _untied_top_k(x, k)) is not None:
        return found
    else:
        kth = -np.partition(-x, k - 1, axis=-1)[:, k - 1: k]  # each row's k-th largest value
        above, tied = x > kth, x == kth
        taken = above | (tied & (np.cumsum(tied, axis=-1) <= k - above.sum(-1, keepdims=True)))
        ids = np.nonzero(taken)[1].reshape(len(x), k)  # per row, in ascending index
        ids = np.take_along_axis(ids, np.lexsort((ids, -np.take_along_axis(x, ids, -1)), axis=-1), -1)
    return np.take_along_axis(x, ids, -1), ids


def _untied_top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """top_k where no row has a tie across its k-th place (then the k best are one set, whatever the order of equal
    values): a third of the time of the general case over 64 x 32,000. None where a row has such a tie."""
    ids = np.argpartition(x, -k, axis=-1)[:, -k:]
    values = np.take_along_axis(x, ids, -1)
    if not np.array_equal(np.count_nonzero(x >= values.min(-1, keepdims=True), axis=-1), np.full(len(x), k)):
        return None
    ids = np.take_along_axis(ids, np.lexsort((ids, -values), axis=-1), -1)  # best first, ties to the lower id
    return np.take_along_axis(x, ids, -1), ids


class Rules:
    """What a step may produce, as Hugging Face's processors rule it, in masks added to the log-probabilities:
    suppressed tokens never, EOS not before min_new_tokens, and only EOS (scored 0) on the last step if forced."""

    def __init__(self, gen: GenerationConfig, eos_id: int, vocab: int) -> None:
        self.free = np.zeros(vocab, np.float32)
        self.free[list(gen.suppress_tokens)] = -np.inf
        self.no_eos = self.free.copy()
        self.no_eos[eos_id] = -np.inf
        self.only_eos = np.full(vocab, -np.inf, np.float32)
        self.only_eos[eos_id] = 0.0
        self.min_new_tokens = 0 if gen.ignore_eos else gen.min_new_tokens
        self.forced_step = gen.max_new_tokens - 1 if gen.forced_eos and not gen.ignore_eos else -1
        self.eos_id = eos_id

    def mask(self, step: int) -> np.ndarray:
        if step == self.forced_step:
            return self.only_eos
        return self.no_eos if step < self.min_new_tokens else self.free

    def top(self, steps: StepModel, tokens: np.ndarray, k: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        values, ids = steps.top(tokens, k, self.mask(step))
        if step == self.forced_step:  # EOS is scored 0 there, not its log-probability
            values = np.where(ids == self.eos_id, np.float32(0.0), np.float32(-np.inf))
        return values, ids

    def log_probs(self, steps: StepModel, tokens: np.ndarray, step: int) -> np.ndarray:
        if step == self.forced_step:
            steps.log_probs(tokens)  # the cache must still grow
            return np.tile(self.only_eos, (len(tokens), 1))
        return steps.log_probs(tokens) + self.mask(step)


def pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad a batch of token lists: (ids (B, S) int64, mask (B, S) int64 with 1 on tokens)."""
    if len(seqs) == 0 or any(len(s) == 0 for s in seqs):
        raise ValueError("every input needs at least one token")
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def search(make_steps: Callable[[int], StepModel], batch: int, gen: GenerationConfig, bos_id: int, eos_id: int,
           pad_id: int, on_token: Callable[[int, int], None] | None = None,
           operator_rules: bool = False) -> list[list[Hypothesis]]:
    """make_steps(rows_per_input) builds a step model over batch * rows_per_input rows. operator_rules: a beam
    that reaches max_new_tokens is scored by its length with the decoder start token, as onnxruntime's BeamSearch
    operator scores it (Hugging Face, and so this search, count the new tokens alone)."""
    if gen.strategy == "beam":
        return _beam(make_steps(gen.num_beams), batch, gen, bos_id, eos_id, pad_id, int(operator_rules))
    produced = greedy_or_sample(make_steps(gen.num_return_sequences), batch, gen, bos_id, eos_id)
    while True:
        try:
            row, token = next(produced)
        except StopIteration as done:
            return done.value
        if on_token is not None:
            on_token(row, token)


def filter_logits(logits: np.ndarray, gen: GenerationConfig) -> np.ndarray:
    """Keep the top_k tokens, then the smallest set whose probability reaches top_p; the rest get -inf."""
    logits = logits.copy()
    if gen.top_k and gen.top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -gen.top_k][:, None]
        logits[logits < kth] = -np.inf
    if gen.top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        drop = np.cumsum(probs, axis=-1) - probs >= gen.top_p  # mass before this token already reaches top_p
        np.put_along_axis(logits, order, np.where(drop, -np.inf, sorted_logits), axis=-1)
    return logits


def _sample(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One token a row, drawn with the uniform numbers `u` (one a row)."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(probs, axis=-1)
    return np.minimum((cdf < u[:, None] * cdf[:, -1:]).sum(-1), logits.shape[-1] - 1)


def greedy_or_sample(steps: StepModel, batch: int, gen: GenerationConfig, bos_id: int,
                     eos_id: int) -> Generator[tuple[int, int], None, list[list[Hypothesis]]]:
    """Greedy or sampled search, one step at a time: yields (row, token) for every token as it is produced, and
    returns the hypotheses. Whoever stops iterating stops the search: nothing runs that nobody reads. Rows that
    have ended leave the step model's batch once they are a quarter of it (`leaving`)."""
    n = gen.num_return_sequences
    rng = np.random.default_rng(gen.seed)
    rows = np.arange(batch * n)  # the row (input x sample) that each of the step model's rows decodes
    tokens = np.full(len(rows), bos_id, dtype=np.int64)
    out: list[list[int]] = [[] for _ in rows]
    scores = np.zeros(len(rows))
    alive = np.ones(len(rows), dtype=bool)
    rules = Rules(gen, eos_id, steps.vocab)
    for step in range(gen.max_new_tokens):
        if gen.strategy == "greedy":
            values, ids = rules.top(steps, tokens, 1, step)
            tokens, chosen = ids[:, 0], values[:, 0]
        else:
            logp = rules.log_probs(steps, tokens, step)
            # shifted and in float64, so that a tiny temperature cannot turn every logit into -inf (or 0 / 0)
            shifted = (logp - logp.max(-1, keepdims=True)).astype(np.float64)
            with np.errstate(over="ignore"):  # a tiny temperature sends all but the best to -inf, as it should
                # one draw for every row of the call, each row its own, whichever rows are still there
                tokens = _sample(filter_logits(shifted / gen.temperature, gen), rng.random(batch * n)[rows])
            chosen = logp[np.arange(len(rows)), tokens]
        scores[rows] += np.where(alive[rows], chosen, 0.0)
        for i in np.flatnonzero(alive[rows]):
            r, token = int(rows[i]), int(tokens[i])
            if token == eos_id and not gen.ignore_eos:
                alive[r] = False
            else:
                out[r].append(token)
                yield r, token
        if not alive.any():
            break
        keep = leaving(alive[rows]) if steps.leaves else None
        if keep is not None:
            steps.reorder(keep)
            rows, tokens = rows[keep], tokens[keep]
    return [[Hypothesis(out[i * n + j], float(scores[i * n + j])) for j in range(n)] for i in range(batch)]


def forced(steps: StepModel, targets: Sequence[Sequence[int]], gen: GenerationConfig, bos_id: int,
           eos_id: int) -> list[float]:
    """Each target's log-probability, fed token by token to its row of `steps` under gen's rules (as the searches
    score it before any length penalty); a target holds every token to score, its EOS too."""
    total, tokens = np.zeros(len(targets)), np.full(len(targets), bos_id, dtype=np.int64)
    rules = Rules(gen, eos_id, steps.vocab)
    for step in range(max(map(len, targets))):
        logp = rules.log_probs(steps, tokens, step)
        tokens = np.array([t[step] if step < len(t) else eos_id for t in targets], dtype=np.int64)
        total += np.where([step < len(t) for t in targets], logp[np.arange(len(targets)), tokens], 0.0)
    return total.tolist()


def leaving(live: np.ndarray) -> np.ndarray | None:
    """The rows to keep when those that ended are a quarter of the batch or more (else None: dropping them would
    copy every cache for little). Rows that ended cost a step model as much as the others."""
    ended = len(live) - int(live.sum())
    return np.flatnonzero(live) if ended and 4 * ended >= len(live) else None


def _beam(steps: StepModel, batch: int, gen: GenerationConfig, bos_id: int, eos_id: int,
          pad_id: int, start_counts: int = 0) -> list[list[Hypothesis]]:
    k = gen.num_beams
    inputs = np.arange(batch)  # the input whose k beams each block of k rows of the step model holds
    beam_scores = np.zeros((batch, k))
    beam_scores[:, 1:] = -np.inf  # all beams start equal: let only the first one expand on step 0
    seqs: list[list[int]] = [[] for _ in range(batch * k)]
    tokens = np.full(batch * k, bos_id, dtype=np.int64)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)

    def penalized(score: float, length: int) -> float:
        return score / (length ** gen.length_penalty)

    rules = Rules(gen, eos_id, steps.vocab)
    width = min(2 * k, steps.vocab)  # each input's 2K best candidates are among each of its rows' 2K best
    for step in range(gen.max_new_tokens):
        blocks = len(inputs)
        values, ids = rules.top(steps, tokens, width, step)  # (blocks*K, W) each
        cand = (beam_scores.reshape(-1, 1) + values).reshape(blocks, k * width)
        top_idx = np.argsort(-cand, axis=-1, kind="stable")[:, : 2 * k]  # (blocks, 2K): rank -> (beam, candidate)
        top_scores = np.take_along_axis(cand, top_idx, axis=-1)
        top_tokens = np.take_along_axis(ids.reshape(blocks, k * width), top_idx, axis=-1)
        next_rows, next_tokens, next_scores = [], [], []
        for j, b in enumerate(inputs):
            chosen: list[tuple[int, int, float]] = []  # (row, token, score)
            if not done[b]:
                for rank in range(top_idx.shape[1]):
                    score, idx = float(top_scores[j, rank]), int(top_idx[j, rank])
                    row, tok = j * k + idx // width, int(top_tokens[j, rank])
                    if tok == eos_id and not gen.ignore_eos:
                        if rank < k:  # an ending beam counts only if it ranks among the K best
                            finished[b].append(Hypothesis(list(seqs[row]), penalized(score, step + 1)))
                    else:
                        chosen.append((row, tok, score))
                    if len(chosen) == k:
                        break
                done[b] = _beam_done(finished[b], chosen[0][2], step + 1, gen)
            if done[b]:  # keep the shapes until its rows leave; they are never read again, nor moved
                chosen = [(j * k + i, pad_id, -np.inf) for i in range(k)]
            for row, tok, score in in_place(chosen, j * k):
                next_rows.append(row)
                next_tokens.append(tok)
                next_scores.append(score)
        seqs = [[*seqs[r], t] for r, t in zip(next_rows, next_tokens, strict=True)]
        tokens = np.array(next_tokens, dtype=np.int64)
        beam_scores = np.array(next_scores).reshape(blocks, k)
        if done.all():
            break
        rows = np.array(next_rows)
        keep = leaving(~done[inputs]) if steps.leaves else None  # done inputs leave with all their beams
        if keep is not None:
            kept_rows = (keep[:, None] * k + np.arange(k)).ravel()
            rows, tokens, beam_scores, inputs = rows[kept_rows], tokens[kept_rows], beam_scores[keep], inputs[keep]
            seqs = [seqs[r] for r in kept_rows]
        steps.reorder(rows)
    for j, b in enumerate(inputs):
        if not done[b]:  # reached max_new_tokens: the running beams compete with the finished ones
            for i in range(k):
                row = j * k + i
                length = len(seqs[row]) + start_counts
                finished[b].append(Hypothesis(seqs[row], penalized(float(beam_scores[j, i]), length)))
    return [sorted(f, key=lambda h: -h.score)[: gen.num_return_sequences] for f in finished]


def in_place(chosen: list[tuple[int, int, float]], first: int) -> list[tuple[int, int, float]]:
    """An input's next beams (row, token, score), placed on its rows first..first+K-1 so that each row's first child
    stays on it: only the second and later children of a row are moved, to the rows whose beams ended. A beam's
    place among its input's rows changes nothing the search computes but the order of exactly tied scores, and the
    step model copies a cache row only for a beam that moved (`reorder`): fewer moves copy less (README: Runtime,
    "Batches and beams")."""
    placed: list[tuple[int, int, float] | None] = [None] * len(chosen)
    extra = []
    for beam in chosen:
        if placed[beam[0] - first] is None:
            placed[beam[0] - first] = beam
        else:
            extra.append(beam)
    free = (i for i, beam in enumerate(placed) if beam is None)
    for beam in extra:
        placed[next(free)] = beam
    return [beam for beam in placed if beam is not None]


def _beam_done(finished: list[Hypothesis], best_running: float, length: int, gen: GenerationConfig) -> bool:
    if len(finished) < gen.num_beams:
        return False
    if gen.early_stopping:
        return True
    # Without early stopping, go on while the best running beam could still beat the worst kept hypothesis.
    worst = sorted(h.score for h in finished)[-gen.num_beams]
    return worst >= best_running / (length ** gen.length_penalty)
