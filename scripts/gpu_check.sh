#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU: the suite's GPU tests (tests/test_gpu.py and the CUDA parity
# test), then Transformer-base throughput of our CUDA bundles (fp32 and fp16) against Hugging Face's model on the same
# GPU, each system in a process of its own. It needs a Python with torch built for CUDA and onnxruntime-gpu
# (`pip install 'edgeformer[gpu]'` replaces onnxruntime), and runs this checkout without installing it.
#   OUT=out/gpu bash scripts/gpu_check.sh        # logs and results under $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
# the folders as the packages they install as (edgeformer.<folder>), as scripts/test.sh gives them to mypy
mkdir -p "$work/pkg/edgeformer"
for folder in model export transforms runtime benchmarks report cli; do
    ln -s "$PWD/$folder" "$work/pkg/edgeformer/$folder"
done
export PYTHONPATH="$work/pkg:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# onnxruntime-gpu loads CUDA's libraries (cuBLAS, cuDNN, ...) from the library path: those of the nvidia-* pip
# packages that torch's CUDA build installed, where there are some
nvidia=$("$PY" -c 'import glob, os, site
print(":".join(sorted({os.path.dirname(p) for d in site.getsitepackages()
                       for p in glob.glob(d + "/nvidia/**/lib*.so*", recursive=True)})))')
export LD_LIBRARY_PATH="$nvidia${LD_LIBRARY_PATH:+${nvidia:+:}$LD_LIBRARY_PATH}"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c 'import onnxruntime as ort, torch
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
    lscpu | grep -E "^Model name|^CPU\(s\)"
} 2>&1 | tee "$OUT/machine.txt"

echo "== the GPU tests" | tee "$OUT/tests.log"
timeout "${TESTS_TIMEOUT:-240}" "$PY" -m pytest -m gpu tests -p no:cacheprovider -q -rfEs -s 2>&1 \
    | tee -a "$OUT/tests.log" || status=1

echo "== throughput on the GPU" | tee "$OUT/throughput.log"
timeout "${MAKE_TIMEOUT:-240}" "$PY" benchmarks/throughput.py make "$work/tp" --device cuda 2>&1 \
    | grep -v "Loading weights" | tee -a "$OUT/throughput.log" || status=1
timeout "${GRID_TIMEOUT:-360}" "$PY" benchmarks/throughput.py grid "$work/tp" --peer torch-cuda-fp32 \
    --systems "${SYSTEMS:-torch-cuda-fp32,torch-cuda-fp16,edgeformer-cuda-fp32,edgeformer-cuda-fp16}" \
    --points "${POINTS:-1x1,64x1,64x4}" --rounds "${ROUNDS:-1}" --out "$OUT/throughput" 2>&1 \
    | tee -a "$OUT/throughput.log" || status=1
exit $status
