#!/usr/bin/env bash
# The whole test suite, with lint and type checks: set up (first run only), ruff, mypy, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check model export transforms runtime benchmarks report cli serve tests
# mypy reads the folders as the packages they install as (edgeformer.<folder>), so that it checks the calls between
# them too: through the editable install's import hook it could not follow them and took them as Any.
rm -rf build/typecheck && mkdir -p build/typecheck/edgeformer
for folder in model export transforms runtime benchmarks report cli serve; do
    ln -s "../../../$folder" "build/typecheck/edgeformer/$folder"
done
MYPYPATH=build/typecheck .venv/bin/mypy -p edgeformer
exec .venv/bin/python -m pytest "$@"
