"""What onnxruntime itself costs a process's peak memory, against CTranslate2, on `edgeformer bench throughput make`'s
model: each system in a process of its own, resident memory after its imports, after loading the model, and the
peak after one generate call; and CTranslate2 again with onnxruntime imported beside it (imported, never used).

    python benchmarks/memory_floor.py FOLDER [--batch 1 --beams 1]

If CTranslate2 with onnxruntime merely imported peaks where our runtime does, the gap between the two is
onnxruntime's own code and state, which no bundle or runtime change removes (README: Benchmarks, "Throughput").
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

SYSTEMS = ("edgeformer-int8", "ct2-int8", "ct2-int8+onnxruntime")


def status() -> dict[str, float]:
    """This process's resident memory now and its peak, in MiB (benchmarks/memory.py reads them)."""
    from edgeformer.benchmarks.memory import peak_rss_mb, rss_mb

    return {"rss_mb": round(rss_mb(), 1), "peak_mb": round(peak_rss_mb(), 1)}


def measure(folder: Path, system: str, batch: int, beams: int, new_tokens: int) -> dict:
    import numpy as np

    vocab = json.loads((folder / "hf" / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(10, vocab - 10, (batch, 32)).tolist()
    if system == "edgeformer-int8":
        importlib.import_module("onnxruntime")  # first, as the runtime's first call would

        stages = {"imported": status()}
        from edgeformer.runtime.session import Runtime

        rt = Runtime(folder / "edgeformer-int8", threads=2)
        stages["loaded"] = status()
        rt.generate(ids, rt.generation_config(strategy="beam" if beams > 1 else "greedy", num_beams=beams,
                                              max_new_tokens=new_tokens, ignore_eos=True, num_return_sequences=1))
    else:
        if system.endswith("+onnxruntime"):
            importlib.import_module("onnxruntime")  # imported, never used
        import ctranslate2

        stages = {"imported": status()}
        translator = ctranslate2.Translator(str(folder / "ct2-int8"), device="cpu", intra_threads=2, inter_threads=1)
        stages["loaded"] = status()
        vocab = json.loads((folder / "ct2-int8" / "shared_vocabulary.json").read_text())
        translator.translate_batch([[vocab[i] for i in seq] for seq in ids], beam_size=beams,
                                   min_decoding_length=new_tokens, max_decoding_length=new_tokens,
                                   max_input_length=0)
    stages["generated"] = status()
    return {"system": system, "batch": batch, "beams": beams, **stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)  # one measurement, in this process
    a = p.parse_args()
    if a.system:
        print(json.dumps(measure(a.folder, a.system, a.batch, a.beams, a.new_tokens)))
        return
    print(f"{'system':<22} {'imported MB':>12} {'loaded MB':>10} {'peak MB':>8}")
    for system in SYSTEMS:
        out = subprocess.run([sys.executable, __file__, str(a.folder), "--system", system, "--batch", str(a.batch),
                              "--beams", str(a.beams), "--new-tokens", str(a.new_tokens)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.splitlines()[-1])
        print(f"{system:<22} {r['imported']['rss_mb']:>12.0f} {r['loaded']['rss_mb']:>10.0f} "
              f"{r['generated']['peak_mb']:>8.0f}")


if __name__ == "__main__":
    main()
