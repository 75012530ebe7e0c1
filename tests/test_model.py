"""The PyTorch model: position encoding, masks, the KV cache, configs."""

from __future__ import annotations

import math

import pytest
import torch

from edgeformer.model.config import ConfigError, TransformerConfig
from edgeformer.model.generate import pad_batch
from edgeformer.model.transformer import PositionalEncoding, Transformer
from tests.helpers import TINY, tiny_model


def test_sinusoidal_encoding_equals_the_papers_formula() -> None:
    d = 16
    pe = PositionalEncoding(d)(torch.arange(50))
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_sinusoidal_encoding_has_no_length_bound() -> None:
    model = tiny_model()
    src = torch.randint(4, 37, (1, 3000))
    assert model(src, torch.ones(1, 2, dtype=torch.long)).shape == (1, 2, 29)


def test_learned_positions_refuse_longer_input() -> None:
    model = tiny_model(position="learned", max_positions=10)
    with pytest.raises(ValueError, match="max_positions=10"):
        model(torch.randint(4, 37, (1, 11)), torch.ones(1, 2, dtype=torch.long))


def test_embeddings_are_scaled_by_sqrt_d_model() -> None:
    model = tiny_model()
    ids = torch.tensor([[5, 6]])
    emb = model.encoder.embed
    expected = emb.tokens(ids) * math.sqrt(32) + emb.positions(torch.arange(2))
    assert torch.allclose(emb(ids), expected)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_source_padding_does_not_leak(norm: str) -> None:
    model = tiny_model(norm=norm)
    tgt = torch.randint(4, 29, (1, 5))
    short = model(torch.tensor([[5, 6, 7]]), tgt)
    for filler in (0, 9, 30):  # whatever stands at a padded position is invisible
        padded = torch.tensor([[5, 6, 7, filler, filler]])
        out = model(padded, tgt, src_mask=torch.tensor([[1, 1, 1, 0, 0]]))
        assert torch.allclose(out, short, atol=1e-5)


def test_future_target_tokens_do_not_leak() -> None:
    model = tiny_model()
    src = torch.randint(4, 37, (2, 6))
    tgt = torch.randint(4, 29, (2, 8))
    base = model(src, tgt)
    changed = tgt.clone()
    changed[:, 5] = 3
    out = model(src, changed)
    assert torch.allclose(out[:, :5], base[:, :5], atol=1e-6)  # positions before the change see nothing of it
    assert not torch.allclose(out[:, 5:], base[:, 5:])  # and the change itself matters


def test_target_padding_mask_hides_left_padding() -> None:
    model = tiny_model()
    src = torch.randint(4, 37, (1, 6))
    tgt = torch.tensor([[1, 8, 9, 10]])
    plain = model(src, tgt)
    padded = model(src, torch.tensor([[0, 0, 1, 8, 9, 10]]), tgt_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))
    # Positions shift with left padding, so compare against the same shift done by hand: only masking is tested.
    shifted = model(src, torch.tensor([[7, 7, 1, 8, 9, 10]]), tgt_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))
    assert torch.allclose(padded[:, 2:], shifted[:, 2:], atol=1e-5)
    assert plain.shape == (1, 4, 29)


@pytest.mark.parametrize("overrides", [{}, {"norm": "pre", "position": "learned", "activation": "gelu"},
                                       {"share_embeddings": True, "tgt_vocab_size": 37, "tie_output": False}])
def test_cached_decoding_equals_full_recompute_on_padded_batches(overrides: dict) -> None:
    model = tiny_model(**overrides)
    src_ids, src_mask = pad_batch([[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]], 0)
    tgt = torch.randint(4, 29, (3, 9))
    with torch.no_grad():
        full = model(src_ids, tgt, src_mask)
        cross = model.decoder.cross_kv(model.encode(src_ids, src_mask))
        past = model.decoder.empty_past(3)
        steps = []
        for t in range(tgt.shape[1]):
            logits, past = model.decoder(tgt[:, t: t + 1], src_mask, cross, past)
            steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert past[0][0].shape == (3, 4, 9, 8)  # (B, H, T, Dh)


def test_rows_grouped_by_source_read_its_cross_cache_as_copies_of_it_would() -> None:
    model = tiny_model()
    src_ids, src_mask = pad_batch([[5, 6, 7, 8, 9, 10, 11], [12, 13]], 0)
    tgt = torch.randint(4, 29, (6, 4))  # three rows per source, each its own tokens
    with torch.no_grad():
        cross = model.decoder.cross_kv(model.encode(src_ids, src_mask))  # (2, H, S, Dh)
        copied = [(k.repeat_interleave(3, 0), v.repeat_interleave(3, 0)) for k, v in cross]
        shared, _ = model.decoder(tgt, src_mask, cross, model.decoder.empty_past(6))
        per_row, _ = model.decoder(tgt, src_mask.repeat_interleave(3, 0), copied, model.decoder.empty_past(6))
        swapped = [(k.flip(0), v.flip(0)) for k, v in cross]  # source 0's rows reading source 1's cache
        wrong, _ = model.decoder(tgt, src_mask.flip(0), swapped, model.decoder.empty_past(6))
    assert torch.allclose(shared, per_row, atol=1e-5)
    assert not torch.allclose(wrong, per_row, atol=1e-3)  # each source's rows read that source's cache


def test_tied_output_projection_is_the_target_embedding() -> None:
    model = tiny_model()
    assert model.decoder.output_projection is None
    shared = tiny_model(share_embeddings=True, tgt_vocab_size=37)
    assert shared.encoder.embed.tokens is shared.decoder.embed.tokens


@pytest.mark.parametrize(("overrides", "message"), [
    ({"d_model": 30, "n_heads": 4}, "divisible by n_heads"),
    ({"n_encoder_layers": 0}, "n_encoder_layers must be a positive integer"),
    ({"activation": "swish"}, "unknown activation 'swish'"),
    ({"position": "rotary"}, "unknown position 'rotary'"),
    ({"norm": "sandwich"}, "unknown norm placement"),
    ({"share_embeddings": True}, "share_embeddings needs one vocabulary"),
    ({"eos_id": 99}, "eos_id"),
])
def test_bad_configs_fail_with_a_clear_message(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TransformerConfig(**{**TINY, **overrides})


def test_config_round_trips_through_a_dict() -> None:
    config = TransformerConfig(**TINY)
    assert TransformerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown config keys"):
        TransformerConfig.from_dict({**config.to_dict(), "rope": True})


def test_dropout_is_off_in_eval_mode() -> None:
    model = tiny_model(dropout=0.5)
    src, tgt = torch.randint(4, 37, (2, 5)), torch.randint(4, 29, (2, 4))
    assert torch.equal(model(src, tgt), model(src, tgt))
    model.train()
    assert not torch.equal(model(src, tgt), model(src, tgt))


def test_model_learns_a_copy_task_quickly() -> None:
    """The training path works end to end: loss falls on a task a Transformer learns in a few dozen steps."""
    model: Transformer = tiny_model(dropout=0.0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        x = torch.randint(4, 29, (32, 6), generator=g)
        dec_in = torch.cat([torch.ones(32, 1, dtype=torch.long), x[:, :-1]], 1)
        loss = torch.nn.functional.cross_entropy(model(x, dec_in).transpose(1, 2), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
