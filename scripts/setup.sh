#!/usr/bin/env bash
# Creates .venv and installs edgeformer with its export and dev extras, once; later calls return at once
# unless pyproject.toml changed. torch is installed pinned first: an unpinned torch pulls the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.edgeformer-installed
WANT=$(sha256sum pyproject.toml scripts/setup.sh examples/node/package.json | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
echo "setting up .venv (first run only; log in .venv/setup.log)..." >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! { .venv/bin/python -m pip install --upgrade pip "setuptools>=77" wheel &&
       .venv/bin/python -m pip install "torch==2.13.0" &&
       .venv/bin/python -m pip install -e ".[export,bench,dev,hf,optimum,images,serve,ep-openvino,ep-webgpu]" &&
       # a plugin provider with a CPU device on any x86 or ARM machine; its metadata asks onnxruntime<1.31, and it
       # runs on 1.32 (tests/test_providers.py)
       .venv/bin/python -m pip install --no-deps "onnxruntime-ggml==0.2.0"; } > .venv/setup.log 2>&1; then
    tail -30 .venv/setup.log >&2
    echo "set-up failed; the whole log is in .venv/setup.log" >&2
    exit 1
fi
# The Node.js example's onnxruntime-node (CPU binaries: its default install script downloads a CUDA provider), where
# npm is on the machine; its test is skipped, and says why, where not.
if command -v npm > /dev/null; then
    (cd examples/node && ONNXRUNTIME_NODE_INSTALL=skip npm install --no-audit --no-fund >> ../../.venv/setup.log 2>&1) ||
        echo "npm could not install examples/node's onnxruntime-node (see .venv/setup.log); its test will be skipped" >&2
fi
# OpenVINO on any x86 CPU: the onnxruntime-openvino wheel, which replaces onnxruntime (so a Python of its own), with
# edgeformer installed beside it (--no-deps: edgeformer asks for onnxruntime itself) and onnx, so that `quantize
# --check-on openvino` runs there too. Its tests and bench use it.
if ! { [ -x .venv-openvino/bin/python ] || "$PY" -m venv .venv-openvino; } ||
   ! { .venv-openvino/bin/python -m pip install "onnxruntime-openvino==1.24.1" "sentencepiece>=0.2" "onnx>=1.16" &&
       .venv-openvino/bin/python -m pip install --no-deps -e .; } >> .venv/setup.log 2>&1; then
    echo "could not set up .venv-openvino (see .venv/setup.log); the OpenVINO tests will be skipped" >&2
fi
echo "$WANT" > "$STAMP"
