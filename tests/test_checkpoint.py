"""Checkpoints: exact round trip, clear errors, atomic writes, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeformer.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.helpers import tiny_model


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = tiny_model(norm="pre", position="learned")
    save_checkpoint(model, tmp_path / "ck")
    loaded, tokenizer = load_checkpoint(tmp_path / "ck")
    assert tokenizer is None
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    src, tgt = torch.randint(4, 37, (2, 5)), torch.randint(4, 29, (2, 3))
    assert torch.equal(model(src, tgt), loaded(src, tgt))


def test_shared_embedding_is_stored_once(tmp_path: Path) -> None:
    model = tiny_model(share_embeddings=True, tgt_vocab_size=37)
    save_checkpoint(model, tmp_path / "ck")
    names = load_file(str(tmp_path / "ck" / "model.safetensors")).keys()
    assert sum("tokens" in n for n in names) == 1
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert loaded.encoder.embed.tokens is loaded.decoder.embed.tokens


def test_existing_checkpoint_is_replaced_only_with_force(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    with pytest.raises(FileExistsError, match="--force"):
        save_checkpoint(tiny_model(seed=1), tmp_path / "ck")
    save_checkpoint(tiny_model(seed=1), tmp_path / "ck", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left behind


def test_missing_and_misshapen_tensors_are_all_named(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["decoder.layers.1.ffn.fc2.weight"]
    tensors["encoder.layers.0.self_attn.q_proj.bias"] = torch.zeros(7)
    tensors["encoder.extra"] = torch.zeros(2)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "ck")
    message = str(err.value)
    assert "missing tensor decoder.layers.1.ffn.fc2.weight" in message
    assert "encoder.layers.0.self_attn.q_proj.bias has shape (7,), the config needs (32,)" in message
    assert "unexpected tensor encoder.extra" in message


def test_config_that_does_not_match_the_weights_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["d_ff"] = 128
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"fc1\.weight has shape"):
        load_checkpoint(tmp_path / "ck")


def test_a_checkpoint_names_its_model_family_and_one_without_is_an_encoder_decoder(tmp_path: Path) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["family"] == "encoder-decoder"
    del config["family"]  # as checkpoints written before families were, the shipped one among them
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(tmp_path / "ck")[0].family == "encoder-decoder"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda ck: (ck / "model.safetensors").write_bytes(b"\x80\x04garbage pickle"), "not a readable safetensors"),
    (lambda ck: (ck / "model.safetensors").unlink(), "model.safetensors: missing"),
    (lambda ck: (ck / "config.json").write_text("{nope"), "not valid JSON"),
    (lambda ck: (ck / "config.json").unlink(), "config.json: no such file"),
    (lambda ck: (ck / "config.json").write_text('{"family": "swin"}'), "unknown model family 'swin'"),
    (lambda ck: (ck / "config.json").write_text("[1, 2]"), "not a JSON object"),
])
def test_corrupt_checkpoint_names_the_file(tmp_path: Path, damage, message: str) -> None:
    save_checkpoint(tiny_model(), tmp_path / "ck")
    damage(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ck")


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nothing")
