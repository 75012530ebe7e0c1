"""Reference generation in PyTorch: greedy, beam search and sampling, all with the KV cache.

This is what the ONNX runtime is compared against, token for token. The search rules (EOS, length limits, beam
bookkeeping, sampling filters) live once, in runtime/search.py, and drive either step model: this one, the PyTorch
decoder, or the runtime's ONNX decoder. So a comparison of the two isolates the thing that differs, the numerics
of the exported graphs, and one seed samples the same tokens from both.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from edgeformer.model.transformer import KV, Transformer
from edgeformer.runtime.options import GenerationConfig, Hypothesis
from edgeformer.runtime.search import StepModel, pad, search


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token lists: (ids (B, S), mask (B, S)) with mask 1 on tokens."""
    ids, mask = pad(seqs, pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask)


class TorchSteps(StepModel):
    """The PyTorch decoder, one step at a time over batch * rows_per_input rows, keeping the cache."""

    def __init__(self, model: Transformer, src_ids: Tensor, src_mask: Tensor, rows_per_input: int) -> None:
        self.model = model
        self.vocab = model.config.tgt_vocab_size
        memory = model.encode(src_ids, src_mask)  # (B, S, D)
        self.src_mask = src_mask.repeat_interleave(rows_per_input, dim=0)  # (B*K, S)
        cross = model.decoder.cross_kv(memory)
        self.cross = [(k.repeat_interleave(rows_per_input, 0), v.repeat_interleave(rows_per_input, 0))
                      for k, v in cross]
        self.past: list[KV] = model.decoder.empty_past(self.src_mask.shape[0], src_ids.device)

    @torch.no_grad()
    def log_probs(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (rows,) -> log-probabilities of the next token (rows, V)."""
        self.model.check_lengths(self.past[0][0].shape[2] + 1)
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))[:, None]  # (rows, 1)
        logits, self.past = self.model.decoder(ids, self.src_mask, self.cross, self.past)
        return logits[:, -1].float().log_softmax(dim=-1).numpy()

    def reorder(self, rows: np.ndarray) -> None:
        index = _keep_rows(self, rows)
        self.past = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.past]


class TorchFullSteps(StepModel):
    """PyTorch without a KV cache: every step runs the decoder over the whole prefix again, as many tutorials
    do. A benchmark reference only: its cost grows with the square of the output length."""

    def __init__(self, model: Transformer, src_ids: Tensor, src_mask: Tensor, rows_per_input: int) -> None:
        self.model = model
        self.vocab = model.config.tgt_vocab_size
        memory = model.encode(src_ids, src_mask).repeat_interleave(rows_per_input, dim=0)
        self.src_mask = src_mask.repeat_interleave(rows_per_input, dim=0)
        self.cross = model.decoder.cross_kv(memory)
        self.prefix = torch.empty((self.src_mask.shape[0], 0), dtype=torch.long)

    @torch.no_grad()
    def log_probs(self, tokens: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))[:, None]
        self.prefix = torch.cat([self.prefix, ids], dim=1)  # (rows, T)
        past = self.model.decoder.empty_past(self.prefix.shape[0])
        logits, _ = self.model.decoder(self.prefix, self.src_mask, self.cross, past)
        return logits[:, -1].float().log_softmax(dim=-1).numpy()

    def reorder(self, rows: np.ndarray) -> None:
        self.prefix = self.prefix[_keep_rows(self, rows)]


def _keep_rows(steps: TorchSteps | TorchFullSteps, rows: np.ndarray) -> Tensor:
    """`rows` as an index; where rows that ended leave (fewer rows), what is fixed per row follows them."""
    index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    if len(index) != len(steps.src_mask):
        steps.src_mask = steps.src_mask.index_select(0, index)
        steps.cross = [(k.index_select(0, index), v.index_select(0, index)) for k, v in steps.cross]
    return index


@torch.no_grad()
def generate(model: Transformer, src: list[list[int]], gen: GenerationConfig | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[Hypothesis]]:
    """Generate for a batch of token-id lists; returns, per input, its hypotheses best first."""
    gen = gen or GenerationConfig()
    model.eval()
    src_ids, src_mask = pad_batch(src, model.config.pad_id)
    cfg = model.config
    return search(lambda rows: TorchSteps(model, src_ids, src_mask, rows), len(src), gen, cfg.bos_id, cfg.eos_id,
                  cfg.pad_id, on_token)
