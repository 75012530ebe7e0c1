"""The model that ships inside the package reaches its accuracy on the held-out split."""

from __future__ import annotations

from edgeformer.model.checkpoint import default_checkpoint, load_checkpoint
from edgeformer.model.tasks import get_task, is_held_out
from edgeformer.model.train import exact_match


def test_shipped_model_reaches_99_percent_exact_match_on_held_out_dates() -> None:
    model, tokenizer = load_checkpoint()
    assert tokenizer is not None
    pairs = get_task("dates").pairs(1000, "test", seed=1)
    assert exact_match(model, tokenizer, pairs) >= 0.99


def test_shipped_model_is_small() -> None:
    assert sum(f.stat().st_size for f in default_checkpoint().iterdir()) < 4_000_000


def test_held_out_split_never_shares_a_date_with_training() -> None:
    import datetime as dt

    task = get_task("dates")
    for _, iso in task.pairs(300, "train"):
        assert not is_held_out(dt.date.fromisoformat(iso))
    for _, iso in task.pairs(300, "test"):
        assert is_held_out(dt.date.fromisoformat(iso))
    assert task.pairs(5, "test") == task.pairs(5, "test")  # deterministic
