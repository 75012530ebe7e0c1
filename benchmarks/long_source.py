"""What one long source costs the runtime, and what it keeps after: each length in a process of its own.

    .venv/bin/python benchmarks/long_source.py BUNDLE [--lengths 32,1024,4000,10000]

Per source length: the seconds of one generate call (16 new tokens, 2 threads), the resident memory (RSS) before
it (after a short warm-up call), right after it, and the process's peak. The encoder's attention takes memory in
the square of the source; what stays resident after the call is what the process keeps holding.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from edgeformer.benchmarks.memory import peak_rss_mb, rss_mb
from edgeformer.report.format import table


def measure(bundle: str, length: int) -> dict[str, float]:
    from edgeformer.runtime.options import GenerationConfig, Limits
    from edgeformer.runtime.session import Runtime

    rt = Runtime(bundle, threads=2, limits=Limits(source_tokens=max(length, 1024)))
    rt.generate([[5] * 8], GenerationConfig(max_new_tokens=2))
    before = rss_mb()
    source = [5 + i % 20 for i in range(length)]
    start = time.perf_counter()
    rt.generate([source], GenerationConfig(max_new_tokens=16))
    seconds = time.perf_counter() - start
    return {"source_tokens": length, "seconds": seconds, "rss_before_mb": before, "rss_after_mb": rss_mb(),
            "peak_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--lengths", default="32,1024,4000,10000")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.bundle, args.child)))
        return
    rows = []
    for length in map(int, args.lengths.split(",")):
        out = subprocess.run([sys.executable, __file__, args.bundle, "--child", str(length)], capture_output=True,
                             text=True, check=True)
        r = json.loads(out.stdout)
        rows.append([length, f"{r['seconds']:.2f}", f"{r['rss_before_mb']:.0f}", f"{r['rss_after_mb']:.0f}",
                     f"{r['peak_mb']:.0f}"])
    print(table(["source tokens", "seconds", "RSS before MB", "RSS after MB", "peak MB"], rows))


if __name__ == "__main__":
    main()
