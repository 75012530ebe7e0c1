"""Peak resident memory of one benchmark configuration, measured in a process of its own.

In the benchmark's process PyTorch, every bundle's sessions and every earlier point are resident at once, so
its peak says nothing about one configuration. A fresh process per configuration loads what a deployment
would (the runtime alone, numpy and onnxruntime; or torch and the checkpoint), decodes once at the point's
sizes and reports its own peak. Host memory only: a GPU provider's device memory is not in it.

    python -m edgeformer.benchmarks.memory '{"system": "onnx", "bundle": ..., ...}'
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

SYSTEMS = ("onnx", "torch-kv", "torch-no-cache")


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB, or None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """This process's resident set now, in MiB (Linux; NaN elsewhere)."""
    now = _status_mb("VmRSS")
    return float("nan") if now is None else now


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB (NaN where the platform tells neither way).

    Linux's VmHWM first: getrusage's ru_maxrss survives execve, so a child started from the benchmark's process
    would report the parent's peak, not its own."""
    peak_mb = _status_mb("VmHWM")
    if peak_mb is not None:
        return peak_mb
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def measure(spec: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Run one configuration in a child process: {"peak_rss_mb": ..., "torch_imported": ...}.

    spec: system (one of SYSTEMS); bundle and provider (onnx) or checkpoint (None: the shipped model; torch);
    threads (and decoder_threads, onnx), batch, src_len, new_tokens, src_vocab_size, bos_id."""
    if spec.get("system") not in SYSTEMS:
        raise ValueError(f"system must be one of {SYSTEMS}, not {spec.get('system')!r}")
    done = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"measuring memory of {spec} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _decode_once(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from edgeformer.benchmarks.latency import time_decode

    rng = np.random.default_rng(0)
    ids = rng.integers(4, spec["src_vocab_size"], (spec["batch"], spec["src_len"]))
    mask = np.ones_like(ids)
    if spec["system"] == "onnx":
        from edgeformer.runtime.session import Runtime

        rt = Runtime(spec["bundle"], providers=[spec["provider"]], threads=spec["threads"],
                     decoder_threads=spec.get("decoder_threads"))
        make: Any = partial(rt.step_model, ids, mask, 1)
    else:
        import torch

        from edgeformer.model.checkpoint import load_checkpoint
        from edgeformer.model.generate import TorchFullSteps, TorchSteps

        torch.set_num_threads(spec["threads"])
        model, _ = load_checkpoint(spec["checkpoint"])
        steps = TorchSteps if spec["system"] == "torch-kv" else TorchFullSteps
        make = partial(steps, model, torch.from_numpy(ids), torch.from_numpy(mask), 1)
    time_decode(make, spec["new_tokens"], spec["bos_id"], spec["batch"])
    return {"peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules}


if __name__ == "__main__":
    print(json.dumps(_decode_once(json.loads(sys.argv[1]))))
