"""Token for token, at the benchmark's size: Optimum's `generate` against our runtime on the same folders, both ways.

    python benchmarks/optimum_tokens.py /tmp/tp [--inputs 100] [--new-tokens 32]

On a folder that `throughput.py make` wrote (with edgeformer[optimum]): Optimum's export of the Hugging Face model
(`optimum-fp32`) run by our runtime, and our bundles in Optimum's layout (`edgeformer-*-optimum`) run by Optimum,
each against the other system on the same folder, greedy and beam 4, with the folder's generation defaults (EOS
ends a sequence). Prints one JSON line per (folder, search): inputs, identical, the first difference if any.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

FOLDERS = ("optimum-fp32", "edgeformer-fp32-optimum", "edgeformer-int8-optimum")


def compare(folder: Path, inputs: int, new_tokens: int, seed: int) -> list[dict[str, Any]]:
    import dataclasses

    import numpy as np
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    from edgeformer.runtime.session import Runtime

    rt = Runtime(folder, threads=2)
    model = ORTModelForSeq2SeqLM.from_pretrained(str(folder))
    c = rt.config
    rng = np.random.default_rng(seed)
    sources = [[int(t) for t in rng.integers(1, c["src_vocab_size"] - 1, rng.integers(4, 32))] + [c["eos_id"]]
               for _ in range(inputs)]
    found = []
    for beams in (1, 4):
        gen = dataclasses.replace(rt.generation, strategy="beam" if beams > 1 else "greedy", num_beams=beams,
                                  max_new_tokens=new_tokens, num_return_sequences=1)
        same, first = 0, None
        for start in range(0, inputs, 16):
            batch = sources[start: start + 16]
            ours = [h[0].tokens for h in rt.generate(batch, gen)]
            longest = max(map(len, batch))
            ids = torch.tensor([s + [c["pad_id"]] * (longest - len(s)) for s in batch])
            mask = (ids != c["pad_id"]).long()
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, do_sample=False,
                                     max_new_tokens=new_tokens).tolist()
            theirs = [row[1: row.index(c["eos_id"], 1)] if c["eos_id"] in row[1:] else row[1:] for row in out]
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                same += a == b
                if a != b and first is None:
                    first = {"input": start + i, "ours": a, "optimum": b}
        found.append({"folder": folder.name, "search": f"beam {beams}" if beams > 1 else "greedy",
                      "inputs": inputs, "identical": same, "first_difference": first})
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--inputs", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    for name in FOLDERS:
        for record in compare(a.folder / name, a.inputs, a.new_tokens, a.seed):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
