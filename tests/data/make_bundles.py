"""Writes the bundles that the runtime's own tests load without torch: `python tests/data/make_bundles.py`.
Run it again (and commit what it writes) when the bundle format changes; the tests refuse stale ones by
their format version."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from edgeformer.export.onnx_export import export  # noqa: E402
from edgeformer.model.checkpoint import save_checkpoint  # noqa: E402
from tests.helpers import SHIPPED_BUNDLES, VARIANTS, tiny_model  # noqa: E402

if __name__ == "__main__":
    for name in SHIPPED_BUNDLES:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tiny_model(**VARIANTS[name]), Path(tmp) / "checkpoint")  # type: ignore[arg-type]
            export(Path(tmp) / "checkpoint", HERE / name, force=True)
        print(f"wrote {HERE / name}")
