#!/usr/bin/env bash
# Creates .venv and installs edgeformer with its export and dev extras, once; later calls return at once
# unless pyproject.toml changed. torch is installed pinned first: an unpinned torch pulls the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.edgeformer-installed
WANT=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
echo "setting up .venv (first run only)..." >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >&2
.venv/bin/python -m pip install -q "torch==2.13.0" >&2
.venv/bin/python -m pip install -q -e ".[export,dev]" >&2
echo "$WANT" > "$STAMP"
