"""Batched generation throughput, side by side with the engines users would pick instead, on the same weights.

    .venv/bin/pip install ctranslate2 'edgeformer[hf]'                  # the peers (optional)
    edgeformer bench throughput make /tmp/tp                            # a random Transformer-base MarianMT, as
                                                                        # Hugging Face, CTranslate2 and our bundles
    edgeformer bench throughput grid /tmp/tp --out benchmarks/results/throughput

(or `.venv/bin/python benchmarks/throughput.py MODE ...`, the same.)

`make` builds one random MarianMT (d_model 512, 6+6 layers, 8 heads, ffn 2048, vocabulary 32,000, OPUS-MT's layout)
and every system's form of it: Hugging Face (`hf/`), CTranslate2 fp32 and int8 (`ct2-*`), and ours, imported with
`edgeformer import marian`, exported, optimized and quantized as `edgeformer bench` chains them (`edgeformer-fp32`
is the optimized fp32 bundle, `edgeformer-int8` int8 with the preset of the CPU that makes it, as CTranslate2 picks
its kernels for the CPU it runs on); where optimum-onnx is installed (edgeformer[optimum], or another Python named
by `--optimum-python`), Optimum's export and int8 quantization too (`optimum-*`, run by benchmarks/optimum_peer.py),
and our bundles in Optimum's layout (`make-optimum`: `edgeformer-*-optimum-layout`, `optimum-on-edgeformer-*`).
`grid` runs each (system, batch x beams) point in a process of its own (a peer's thread pool slows whatever runs
after it in the same process), one warm-up then `--repeats` timed calls, every hypothesis exactly `--new-tokens`
long (EOS ignored). It reports tokens/s (the best hypothesis of each input), ms per decoding step, peak resident
memory, and for our runtime the share of wall time spent outside onnxruntime; then ratios against `--peer`
(CTranslate2 int8), a table and a plot. `--rounds N` runs the whole grid N times over and reports the median run of
each point.

On a GPU (scripts/gpu_check.sh): `make --device cuda` builds our bundle optimized for CUDA and its fp16 variant, and
`grid --systems edgeformer-cuda-fp32,edgeformer-cuda-fp16,torch-cuda-fp32,torch-cuda-fp16 --peer torch-cuda-fp32`
runs them against Hugging Face's model on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeformer.benchmarks.optimum_peer import SYSTEMS as OPTIMUM
from edgeformer.benchmarks.optimum_peer import sources
from edgeformer.model.config import BASE_SIZE

SEARCH_BUNDLE = "edgeformer-int8-search"
LAYOUTS = {"fp32": "edgeformer-fp32-optimum", "int8": "edgeformer-int8-optimum"}  # our bundles in Optimum's layout

# system -> (bundle folder, provider, search); (device, dtype) of Hugging Face's model
EDGEFORMER = {"edgeformer-int8": ("edgeformer-int8", "cpu", "python"),
              "edgeformer-fp32": ("edgeformer-opt", "cpu", "python"),
              "edgeformer-cuda-fp32": ("edgeformer-cuda", "cuda", "python"),
              "edgeformer-cuda-fp16": ("edgeformer-cuda-fp16", "cuda", "python"),
              # the int8 bundle with its search in one graph (`make-search`), run by that graph and by our Python
              # search over its two graphs (their cache concatenated, as the operator takes it)
              "edgeformer-int8-graph": (SEARCH_BUNDLE, "cpu", "graph"),
              "edgeformer-int8-concat": (SEARCH_BUNDLE, "cpu", "python"),
              # Optimum's layout (`make-optimum`): our runtime on Optimum's own export, and on the folders that
              # `--layout optimum` cuts from our concatenated-cache bundles (the fp32 one, optimized, and int8)
              "edgeformer-on-optimum-fp32": ("optimum-fp32", "cpu", "python"),
              "edgeformer-on-optimum-int8": ("optimum-int8", "cpu", "python"),
              "edgeformer-fp32-concat": ("edgeformer-opt-concat", "cpu", "python"),
              "edgeformer-fp32-optimum-layout": (LAYOUTS["fp32"], "cpu", "python"),
              "edgeformer-int8-optimum-layout": (LAYOUTS["int8"], "cpu", "python")}
TORCH = {"torch": ("cpu", "float32"), "torch-cuda-fp32": ("cuda", "float32"), "torch-cuda-fp16": ("cuda", "float16")}
CT2 = ("ct2-int8", "ct2-fp32")
SYSTEMS = (*EDGEFORMER, *CT2, *TORCH)
CPU_SYSTEMS = tuple(s for s in SYSTEMS if "cuda" not in s)  # grid's default
OPTIMUM_PEER = Path(__file__).with_name("optimum_peer.py")  # run by another environment's Python
BASE = {"d_model": BASE_SIZE["d_model"], "layers": BASE_SIZE["n_encoder_layers"], "heads": BASE_SIZE["n_heads"],
        "ffn": BASE_SIZE["d_ff"], "vocab": BASE_SIZE["src_vocab_size"]}
SMALL = {"d_model": 64, "layers": 2, "heads": 4, "ffn": 128, "vocab": 1000}


# -- make -------------------------------------------------------------------------------------------------------

def write_tokenizer(hf: Path, vocab_size: int, seed: int) -> None:
    """source.spm/target.spm (one tiny SentencePiece model) and a vocab.json of exactly `vocab_size` pieces:
    </s> 0, <unk> 1, the SentencePiece pieces, unique fillers, <pad> last (OPUS-MT's order)."""
    import io

    import sentencepiece as spm
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model,
                                   vocab_size=min(200, vocab_size // 2), character_coverage=1.0,
                                   bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2)
    for name in ("source.spm", "target.spm"):
        (hf / name).write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(hf / "source.spm"))
    pieces = list(dict.fromkeys(sp.id_to_piece(i) for i in range(1, sp.get_piece_size())))
    vocab = ["</s>", "<unk>", *pieces]
    vocab += [f"<x{i}>" for i in range(vocab_size - 1 - len(vocab))] + ["<pad>"]
    assert len(vocab) == len(set(vocab)) == vocab_size
    (hf / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(vocab)}))


def make_search(out: Path, inputs: int = 16) -> None:
    """The int8 bundle with its search in one graph, from `make`'s fp32 export: optimized with the cache the
    operator takes (concatenated), then quantized; both checked token for token on `inputs` random inputs."""
    from edgeformer.transforms.derive import Judging, optimize, quantize

    concat = out / "edgeformer-opt-concat"
    optimize(out / "edgeformer-fp32", concat, force=True, search="beam", judging=Judging(inputs=inputs))
    quantize(concat, out / SEARCH_BUNDLE, to="int8", preset="auto", force=True, search="beam",
             judging=Judging(inputs=inputs))


def make_optimum(out: Path, optimum_python: str | None, seed: int = 0) -> None:
    """Optimum's export of the Hugging Face model and its int8 (benchmarks/optimum_peer.py, with the Python that has
    optimum-onnx), and our concatenated-cache bundles of `make_search` cut into Optimum's layout, each checked token
    for token against its bundle on 16 inputs."""
    from edgeformer.transforms.optimum_layout import write_optimum

    vocab_size = json.loads((out / "hf" / "config.json").read_text())["vocab_size"]
    for variant, bundle in (("fp32", "edgeformer-opt-concat"), ("int8", SEARCH_BUNDLE)):
        write_optimum(out / bundle, out / LAYOUTS[variant], sources(vocab_size, 16, 16, seed), force=True)
    if optimum_python:
        subprocess.run([optimum_python, str(OPTIMUM_PEER), "make", str(out / "hf"), str(out)], check=True)


def make(out: Path, seed: int, small: bool, optimum_python: str | None = None, device: str = "cpu") -> None:
    """The model as every system of `device` runs it: CTranslate2's and our CPU bundles, or our CUDA ones."""
    import torch
    import transformers
    size = SMALL if small else BASE
    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    write_tokenizer(hf, size["vocab"], seed)
    pad = size["vocab"] - 1
    config = transformers.MarianConfig(
        vocab_size=size["vocab"], d_model=size["d_model"], encoder_layers=size["layers"],
        decoder_layers=size["layers"], encoder_attention_heads=size["heads"], decoder_attention_heads=size["heads"],
        encoder_ffn_dim=size["ffn"], decoder_ffn_dim=size["ffn"], max_position_embeddings=512,
        activation_function="swish", scale_embedding=True, share_encoder_decoder_embeddings=True,
        pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0, forced_eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():  # CTranslate2 starts the decoder from a zero embedding; HF from the pad row: make them equal
        model.get_input_embeddings().weight[pad].zero_()
    model.save_pretrained(str(hf))  # safetensors
    tokenizer = transformers.MarianTokenizer(str(hf / "source.spm"), str(hf / "target.spm"), str(hf / "vocab.json"))
    tokenizer.save_pretrained(str(hf))
    assert len(tokenizer.get_vocab()) == size["vocab"], len(tokenizer.get_vocab())
    if device == "cpu":
        try:
            import ctranslate2
        except ImportError:
            print("ctranslate2 is not installed: no CTranslate2 models (pip install ctranslate2)")
        else:
            for name, quantization in (("ct2-fp32", None), ("ct2-int8", "int8")):
                ctranslate2.converters.TransformersConverter(str(hf)).convert(str(out / name),
                                                                              quantization=quantization, force=True)
    from edgeformer.export.onnx_export import export
    from edgeformer.model.importers.marian import import_marian
    from edgeformer.transforms.derive import Judging, optimize, quantize

    import_marian(hf, out / "edgeformer-ckpt", force=True)
    export(out / "edgeformer-ckpt", out / "edgeformer-fp32", force=True)
    if device == "cuda":
        # written whatever their figures (the CUDA fp32 bundle misses its 1e-4 gate, README: "On an NVIDIA GPU"),
        # which are printed; fp16 judged on 32 inputs, as that runs on the CPU
        report = optimize(out / "edgeformer-fp32", out / "edgeformer-cuda", provider="cuda", force=True,
                          allow_drop=True)
        print(f"fp32 optimized for CUDA against fp32: {report.figures}")
        report = quantize(out / "edgeformer-cuda", out / "edgeformer-cuda-fp16", to="fp16", force=True,
                          allow_drop=True, judging=Judging(inputs=32))
        print(f"fp16 against fp32 on 32 random inputs: {report.figures}")
        print(f"wrote {out}: hf, edgeformer-cuda, edgeformer-cuda-fp16")
        return
    optimize(out / "edgeformer-fp32", out / "edgeformer-opt", force=True)
    quantize(out / "edgeformer-opt", out / "edgeformer-int8", to="int8", preset="auto", force=True)
    make_search(out)
    make_optimum(out, optimum_python, seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: hf ({params / 1e6:.1f}M parameters), edgeformer-opt, edgeformer-int8, and ct2-* if there")


# -- run --------------------------------------------------------------------------------------------------------

def ct2_generator(path: Path, ids: list[list[int]], beams: int, new_tokens: int, threads: int,
                  ) -> tuple[Callable[[], None], str]:
    import ctranslate2
    translator = ctranslate2.Translator(str(path), device="cpu", intra_threads=threads, inter_threads=1)
    # The converted Marian vocabulary is HF's without the trailing <pad> (CT2 starts from a zero embedding instead),
    # so ids below pad map to the same pieces; CT2 takes pieces, and the source must carry its own </s>.
    vocab = json.loads((path / "shared_vocabulary.json").read_text())
    tokens = [[vocab[i] for i in seq] for seq in ids]

    def call() -> None:
        # min/max_decoding_length count generated tokens (not the decoder start token); EOS is masked while the
        # length is below min, and decoding stops at max, so every hypothesis holds exactly N tokens, none EOS.
        results = translator.translate_batch(tokens, beam_size=beams, max_batch_size=len(tokens), num_hypotheses=1,
                                             min_decoding_length=new_tokens, max_decoding_length=new_tokens,
                                             return_scores=True, max_input_length=0)
        lengths = {len(r.hypotheses[0]) for r in results}
        assert lengths == {new_tokens}, f"CTranslate2 generated {lengths} tokens, not {new_tokens}"
    return call, translator.compute_type


def torch_generator(path: Path, ids: list[list[int]], beams: int, new_tokens: int, threads: int,
                    device: str = "cpu", dtype: str = "float32") -> tuple[Callable[[], None], str]:
    import torch
    import transformers
    torch.set_num_threads(threads)
    model = transformers.MarianMTModel.from_pretrained(str(path)).eval().to(device, getattr(torch, dtype))
    input_ids = torch.tensor(ids, device=device)

    def call() -> None:
        with torch.inference_mode():
            # forced_eos_token_id=None: Marian's default would force EOS as the N-th token.
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), num_beams=beams,
                                 do_sample=False, use_cache=True, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                                 forced_eos_token_id=None, num_return_sequences=1)
        assert out.shape == (len(ids), 1 + new_tokens), f"generate returned {tuple(out.shape)}"  # 1: decoder start
        # reading the tokens back waits for the GPU's work to end
        assert not bool((out[:, 1:] == model.config.eos_token_id).any()), "EOS among the forced tokens"
    return call, str(model.dtype).removeprefix("torch.")


def edgeformer_generator(path: Path, ids: list[list[int]], beams: int, new_tokens: int, threads: int,
                         provider: str = "cpu", search: str = "python",
                         ) -> tuple[Callable[[], None], str, Callable[[], float]]:
    """Our runtime, and a clock of the time spent inside onnxruntime's runs (the rest is Python and numpy)."""
    from edgeformer.runtime import engine, optimum, session
    from edgeformer.runtime.session import Runtime

    inside = [0.0]
    base_init, base_run = engine.StepBinding.__init__, session.Runtime._run

    def timed(run: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return run(*args)
            finally:
                inside[0] += time.perf_counter() - start
        return wrapped

    def init(self: Any, s: Any) -> None:
        base_init(self, s)
        self.run = timed(self.run)

    # wrapped here, in the benchmark's own process: the runtime itself keeps no clock
    setattr(engine.StepBinding, "__init__", init)  # noqa: B010
    setattr(session.Runtime, "_run", timed(base_run))  # noqa: B010
    setattr(optimum.OptimumSteps, "_run", timed(optimum.OptimumSteps._run))  # noqa: B010
    rt = Runtime(path, providers=[provider], threads=threads, search=search)
    assert rt.provider == engine.provider(provider).name, f"{provider} asked, {rt.provider} given"
    # EOS ignored; where a bundle carries its search in one graph, whose operator cannot ignore it, forbidden (the
    # Python search too, to do the same work): every hypothesis holds new_tokens tokens either way. A graph built
    # without early stopping (Marian's default) has no greedy form: batch 1 runs as one beam there, in both.
    found = rt.manifest.search if rt.layout == "edgeformer" else None  # a folder in Optimum's layout has none
    fixed = ({"min_new_tokens": new_tokens, "forced_eos": False, "early_stopping": found["early_stopping"]}
             if found else {"ignore_eos": True})
    strategy = "beam" if beams > 1 or (found and not found["early_stopping"]) else "greedy"
    gen = rt.generation_config(strategy=strategy, num_beams=beams, max_new_tokens=new_tokens,
                               num_return_sequences=1, length_penalty=1.0, **fixed)

    def call() -> None:
        hyps = rt.generate(ids, gen)
        assert {len(h[0].tokens) for h in hyps} == {new_tokens}

    def onnxruntime_seconds() -> float:
        seconds, inside[0] = inside[0], 0.0
        return seconds

    return call, rt.variant, onnxruntime_seconds


def versions() -> dict[str, str]:
    from edgeformer.runtime.bundle import producer_versions

    return {"python": platform.python_version(), **producer_versions(("ctranslate2", "torch", "transformers",
                                                                        "numpy"))}


def run(a: argparse.Namespace) -> dict[str, Any]:
    from edgeformer.benchmarks.memory import peak_rss_mb

    vocab_size = json.loads((a.folder / "hf" / "config.json").read_text())["vocab_size"]
    ids = sources(vocab_size, a.batch, a.src_len, a.seed)
    inside: Callable[[], float] | None = None
    if a.system in TORCH:
        call, compute_type = torch_generator(a.folder / "hf", ids, a.beams, a.new_tokens, a.threads,
                                             *TORCH[a.system])
    elif a.system in EDGEFORMER:
        folder, provider, search = EDGEFORMER[a.system]
        call, compute_type, inside = edgeformer_generator(a.folder / folder, ids, a.beams, a.new_tokens,
                                                          a.threads, provider, search)
    else:
        call, compute_type = ct2_generator(a.folder / a.system, ids, a.beams, a.new_tokens, a.threads)
    call()  # warm-up (also checks the lengths)
    times, outside = [], []
    for _ in range(a.repeats):
        if inside is not None:
            inside()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        if inside is not None:
            outside.append(1 - inside() / times[-1])
    seconds = statistics.median(times)
    return {"system": a.system, "batch": a.batch, "beams": a.beams, "src_len": a.src_len, "new_tokens": a.new_tokens,
            "threads": a.threads, "compute_type": compute_type, "seconds_median": round(seconds, 6),
            "seconds_all": [round(t, 6) for t in times], "ms_per_step": round(seconds / a.new_tokens * 1000, 3),
            "tokens_per_s": round(a.batch * a.new_tokens / seconds, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "outside_onnxruntime": round(statistics.median(outside), 4) if outside else None,
            "versions": versions()}


# -- grid -------------------------------------------------------------------------------------------------------

def grid(a: argparse.Namespace) -> None:
    """Every system at every point, each run in a process of its own, the systems side by side point by point;
    with --rounds N the whole grid N times over, each figure the median run of its N (a shared machine's speed
    drifts by more than the differences measured: alternating rounds spread the drift over every system)."""
    points = [tuple(int(x) for x in p.lower().split("x")) for p in a.points.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    a.optimum_python = a.optimum_python or _optimum_here()
    systems = a.systems.split(",") if a.systems else [*CPU_SYSTEMS, *(OPTIMUM if a.optimum_python else ())]
    if any(s in OPTIMUM for s in systems) and not a.optimum_python:
        raise SystemExit("the optimum-* systems need optimum-onnx: pip install 'edgeformer[optimum]', or pass "
                         "--optimum-python with a Python that has it")
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for _round in range(a.rounds):
        for batch, beams, system in ((b, k, s) for b, k in points for s in systems):
            where = [a.optimum_python, str(OPTIMUM_PEER)] if system in OPTIMUM else [sys.executable, __file__]
            cmd = [*where, "run", str(a.folder), "--system", system, "--batch", str(batch),
                   "--beams", str(beams), "--src-len", str(a.src_len), "--new-tokens", str(a.new_tokens),
                   "--threads", str(a.threads), "--repeats", str(a.repeats), "--seed", str(a.seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout, check=False)
            if proc.returncode != 0:
                print(f"{system} {batch}x{beams} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.setdefault((system, batch, beams), []).append(r)
            print(f"{system:<16} batch {batch:>3} beams {beams}: {r['tokens_per_s']:>8.1f} tokens/s, "
                  f"{r['peak_rss_mb']:.0f} MB", flush=True)
    rows = []
    for found in runs.values():  # the median run by speed (of an even count, the slower middle one)
        middle = sorted(found, key=lambda r: r["tokens_per_s"])[(len(found) - 1) // 2]
        rows.append({**middle, "rounds_tokens_per_s": [r["tokens_per_s"] for r in found]})
    if a.out:
        write(rows, a.out, a.peer)


def write(rows: list[dict[str, Any]], out: Path, peer_system: str = "ct2-int8") -> None:
    """results.json, results.md (ratios to `peer_system` at the same point) and tokens_per_s.png."""
    from edgeformer.benchmarks.sweep import machine, replace_file
    from edgeformer.report.format import table

    out.mkdir(parents=True, exist_ok=True)
    replace_file(out / "results.json",
                 lambda p: p.write_text(json.dumps({"machine": machine(), "records": rows}, indent=1) + "\n"))
    peer = {(r["batch"], r["beams"]): r["tokens_per_s"] for r in rows if r["system"] == peer_system}
    lines = [[r["system"], f"{r['batch']}x{r['beams']}", f"{r['tokens_per_s']:.0f}",
              f"{r['tokens_per_s'] / peer[(r['batch'], r['beams'])]:.2f}x" if (r["batch"], r["beams"]) in peer
              else "", f"{r['ms_per_step']:.1f}", f"{r['peak_rss_mb']:.0f}",
              "" if r["outside_onnxruntime"] is None else f"{r['outside_onnxruntime']:.0%}"] for r in rows]
    header = ["system", "batch x beams", "tokens/s", f"vs {peer_system}", "ms/step", "peak MB", "outside onnxruntime"]
    replace_file(out / "results.md", lambda p: p.write_text(table(header, lines) + "\n"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(f"{r['batch']}x{r['beams']}" for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        values = {f"{r['batch']}x{r['beams']}": r["tokens_per_s"] for r in rows if r["system"] == system}
        ax.bar([j + i * width for j in range(len(labels))], [values.get(label, 0) for label in labels], width,
               label=system)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels)
    ax.set_xlabel("batch x beams")
    ax.set_ylabel("tokens / s")
    ax.legend()
    fig.tight_layout()
    replace_file(out / "tokens_per_s.png", lambda p: fig.savefig(p, dpi=120, format="png"))
    print(f"results in {out}")


def _optimum_here() -> str | None:
    """This Python, where it has optimum-onnx (edgeformer[optimum]): the optimum-* systems need no other."""
    from importlib.util import find_spec

    return sys.executable if find_spec("optimum") and find_spec("optimum.onnxruntime") else None


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of 1 or more")
    return int(text)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """`edgeformer bench throughput MODE ...` (cli) or `python benchmarks/throughput.py MODE ...`."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("make")
    m.add_argument("folder", type=Path)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--small", action="store_true", help="d_model 64, 2+2 layers, vocabulary 1000: for tests")
    m.add_argument("--optimum-python", default=None,
                   help="a Python with optimum-onnx (default: this one, if it has it): also export and quantize the "
                        "model with Optimum")
    m.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: our bundles optimized for CUDA, fp32 and fp16 (needs onnxruntime-gpu and a GPU)")
    ms = sub.add_parser("make-search", help="only the int8 bundle with its search in one graph, in a made folder")
    ms.add_argument("folder", type=Path)
    mo = sub.add_parser("make-optimum", help="only Optimum's export and our bundles in its layout, in a made folder")
    mo.add_argument("folder", type=Path)
    mo.add_argument("--optimum-python", default=None, help="a Python with optimum-onnx (default: this one, if it has "
                    "it)")
    for name in ("run", "grid"):
        s = sub.add_parser(name)
        s.add_argument("folder", type=Path)
        s.add_argument("--src-len", type=int, default=32)
        s.add_argument("--new-tokens", type=int, default=64)
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--repeats", type=int, default=3)
        s.add_argument("--seed", type=int, default=0)
    r = sub.choices["run"]
    r.add_argument("--system", choices=SYSTEMS, required=True)  # Optimum's run in benchmarks/optimum_peer.py
    r.add_argument("--batch", type=int, required=True)
    r.add_argument("--beams", type=int, required=True)
    g = sub.choices["grid"]
    g.add_argument("--systems", default=None, help=f"comma-separated, of {', '.join((*SYSTEMS, *OPTIMUM))}; "
                   "default: the CPU's, Optimum's with --optimum-python")
    g.add_argument("--optimum-python", default=None,
                   help="the Python that runs the optimum-* systems (default: this one, if it has optimum-onnx)")
    g.add_argument("--peer", default="ct2-int8", help="the system the ratios are taken against")
    g.add_argument("--points", default="1x1,8x1,16x1,32x1,1x4,8x4,16x4,32x4", help="BATCHxBEAMS,...")
    g.add_argument("--out", type=Path, default=None, help="folder for results.json, results.md, tokens_per_s.png")
    g.add_argument("--timeout", type=float, default=None, help="seconds per run")
    g.add_argument("--rounds", type=_at_least_one, default=1,
                   help="run the grid this many times; report each point's median run")
    a = p.parse_args(argv)
    if a.mode == "make":
        make(a.folder, a.seed, a.small, a.optimum_python or _optimum_here(), a.device)
    elif a.mode == "make-search":
        make_search(a.folder)
    elif a.mode == "make-optimum":
        make_optimum(a.folder, a.optimum_python or _optimum_here())
    elif a.mode == "run":
        print(json.dumps(run(a)))
    else:
        grid(a)


if __name__ == "__main__":
    main()
