"""Hugging Face Optimum's ORTModelForSeq2SeqLM as a peer of `edgeformer bench throughput`.

It imports nothing of ours, so that it can run in an environment of its own (`--optimum-python`); with
edgeformer[optimum] installed the throughput grid runs it with its own Python, one process per point, and reads the
JSON line it prints.

`make HF OUT`: Optimum's own export of the Hugging Face model (`optimum-fp32`: encoder, decoder and decoder with
past) and its dynamic int8 quantization of each graph (`optimum-int8`, AutoQuantizationConfig for AVX-512 VNNI,
per channel). `run`: as benchmarks/throughput.py's run, for one of them, or for Optimum generating from our bundles
cut into its layout (`optimum-on-edgeformer-*`, folders that `throughput.py make-optimum` writes)."""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

# system -> its folder
FOLDERS = {"optimum-fp32": "optimum-fp32", "optimum-int8": "optimum-int8",
           "optimum-on-edgeformer-fp32": "edgeformer-fp32-optimum",
           "optimum-on-edgeformer-int8": "edgeformer-int8-optimum"}
SYSTEMS = tuple(FOLDERS)


def make(hf: Path, out: Path) -> None:
    from optimum.onnxruntime import ORTModelForSeq2SeqLM, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    fp32 = out / "optimum-fp32"
    ORTModelForSeq2SeqLM.from_pretrained(str(hf), export=True, use_cache=True).save_pretrained(str(fp32))
    config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
    int8 = out / "optimum-int8"
    for graph in sorted(fp32.glob("*.onnx")):
        ORTQuantizer.from_pretrained(str(fp32), file_name=graph.name).quantize(
            save_dir=str(int8), quantization_config=config)
    for path in fp32.glob("*.json"):  # the model's config and generation config beside the quantized graphs
        (int8 / path.name).write_bytes(path.read_bytes())
    print(f"wrote {fp32} and {int8}")


def sources(vocab_size: int, batch: int, src_len: int, seed: int) -> list[list[int]]:
    """The inputs every system of the throughput grid is fed (defined here, where nothing of ours is imported):
    `batch` sequences of `src_len` ids, src_len-1 ids in [1, vocab-2] (never eos 0 or pad vocab-1), then eos."""
    rng = random.Random(seed)
    return [[rng.randint(1, vocab_size - 2) for _ in range(src_len - 1)] + [0] for _ in range(batch)]


def run(a: argparse.Namespace) -> dict:
    import onnxruntime as ort
    import optimum.version
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    torch.set_num_threads(a.threads)
    folder = a.folder / FOLDERS[a.system]
    options = ort.SessionOptions()
    options.intra_op_num_threads = a.threads
    options.inter_op_num_threads = 1
    names = {}
    if a.system == "optimum-int8":
        names = {"encoder_file_name": "encoder_model_quantized.onnx",
                 "decoder_file_name": "decoder_model_quantized.onnx",
                 "decoder_with_past_file_name": "decoder_with_past_model_quantized.onnx"}
    model = ORTModelForSeq2SeqLM.from_pretrained(str(folder), use_cache=True, session_options=options, **names)
    vocab_size = json.loads((a.folder / "hf" / "config.json").read_text())["vocab_size"]
    input_ids = torch.tensor(sources(vocab_size, a.batch, a.src_len, a.seed))
    eos = model.config.eos_token_id

    def call() -> None:
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), num_beams=a.beams,
                                 do_sample=False, use_cache=True, min_new_tokens=a.new_tokens,
                                 max_new_tokens=a.new_tokens, forced_eos_token_id=None, num_return_sequences=1)
        assert out.shape == (a.batch, 1 + a.new_tokens), f"generate returned {tuple(out.shape)}"
        assert not bool((out[:, 1:] == eos).any()), "EOS among the forced tokens"

    call()  # warm-up (also checks the lengths)
    times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"system": a.system, "batch": a.batch, "beams": a.beams, "src_len": a.src_len, "new_tokens": a.new_tokens,
            "threads": a.threads, "compute_type": a.system.rsplit("-", 1)[-1],
            "seconds_median": round(seconds, 6), "seconds_all": [round(t, 6) for t in times],
            "ms_per_step": round(seconds / a.new_tokens * 1000, 3),
            "tokens_per_s": round(a.batch * a.new_tokens / seconds, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "outside_onnxruntime": None,
            "versions": {"python": platform.python_version(), "optimum": optimum.version.__version__,
                         "transformers": transformers.__version__, "onnxruntime": ort.__version__,
                         "torch": torch.__version__}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("make")
    m.add_argument("hf", type=Path)
    m.add_argument("out", type=Path)
    r = sub.add_parser("run")
    r.add_argument("folder", type=Path)
    r.add_argument("--system", choices=SYSTEMS, required=True)
    r.add_argument("--batch", type=int, required=True)
    r.add_argument("--beams", type=int, required=True)
    r.add_argument("--src-len", type=int, default=32)
    r.add_argument("--new-tokens", type=int, default=64)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.mode == "make":
        make(a.hf, a.out)
    else:
        print(json.dumps(run(a)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
