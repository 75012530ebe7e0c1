#!/usr/bin/env bash
# The main job: set up (first run only), then the end-to-end demo on the model that ships in the package.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/edgeformer demo "$@"
