#!/usr/bin/env bash
# The whole test suite, with lint and type checks: set up (first run only), ruff, mypy, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check model export runtime cli tests benchmarks
.venv/bin/mypy model export runtime cli benchmarks
exec .venv/bin/python -m pytest "$@"
