#!/usr/bin/env bash
# The whole test suite, with lint and type checks: set up (first run only), ruff, mypy, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check model export transforms runtime benchmarks report cli tests
.venv/bin/mypy model export transforms runtime benchmarks report cli
exec .venv/bin/python -m pytest "$@"
