"""`edgeformer translate`: a corpus through a bundle, a line in and a line out, on Ray Data across a cluster's actors
or in this process where Ray is not installed.

Lines are sorted by length into batches (little padding), and each batch's outputs are written to a part file of
their own, atomically, as soon as they are done: a run that stops (a crash, Ctrl-C, a lost node) resumes where it
was, and what is written stays written. The output keeps the input's order and is written, atomically, once every
part is in; the parts folder then goes. Every line is checked before any is run: a bad one stops the run with its
line number, before anything is written. Blank lines stay blank.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeformer.runtime.bundle import MANIFEST_FILE, write_file, writer_lock
from edgeformer.runtime.errors import EdgeformerError, InputError
from edgeformer.runtime.options import GenerationConfig, Limits
from edgeformer.runtime.session import Runtime
from edgeformer.runtime.tokenizer import parse_ids
from edgeformer.serve.cluster import actor_threads

ENGINES = ("auto", "ray", "local")
ACTOR_CPUS = 1  # what Ray reserves for each Translator actor, and so its intra-op threads unless asked otherwise
JOB_FILE = "job.json"


def part_path(parts: Path, batch: int) -> Path:
    return parts / f"{batch:06d}.json"


def outputs(rt: Runtime, src: list[list[int]], gen: GenerationConfig, as_ids: bool) -> list[str]:
    """Each source's best hypothesis as one line: text, or token ids with as_ids (or a bundle without a tokenizer)."""
    best = [hs[0].tokens for hs in rt.generate(src, gen)]
    if as_ids or rt.tokenizer is None:
        return [" ".join(map(str, tokens)) for tokens in best]
    # a line a source: a newline the tokenizer makes would shift every line after it
    return [rt.tokenizer.decode(tokens).replace("\n", " ").replace("\r", " ") for tokens in best]


@dataclass(frozen=True)
class Work:
    """What every worker needs to run batches: where the bundle is, and how to run it."""

    bundle: str
    gen: GenerationConfig
    as_ids: bool
    threads: int | None
    limits: Limits

    def runtime(self) -> Runtime:
        return Runtime(self.bundle, threads=self.threads, limits=self.limits)

    def run(self, rt: Runtime, batch: int, src: list[list[int]]) -> list[str]:
        """One batch's output lines. A seeded sample draws from a seed of the batch's own, so that batches do not
        repeat each other's draws and a resumed run draws what the first would have."""
        gen = self.gen
        if gen.seed is not None:
            gen = replace(gen, seed=int(np.random.SeedSequence([gen.seed, batch]).generate_state(1)[0]))
        return outputs(rt, src, gen, self.as_ids)


class Translator:
    """A Ray Data actor: loads the runtime once, then translates the batches it is handed. The lines go back to
    the driver, which writes the parts: on a cluster an actor's disk is not the driver's."""

    def __init__(self, work: Work) -> None:
        self.work = work
        self.rt = work.runtime()

    def __call__(self, rows: dict[str, Any]) -> dict[str, Any]:
        done = [json.dumps(self.work.run(self.rt, int(batch), json.loads(src)))
                for batch, src in zip(rows["batch"], rows["src"], strict=True)]
        return {"batch": list(rows["batch"]), "lines": done}


@dataclass
class Progress:
    """One line on standard error: lines done of all, and the rate; rewritten in place on a terminal."""

    total: int
    done: int = 0
    started: float = 0.0
    shown: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.shown = time.monotonic()

    def add(self, lines: int) -> None:
        self.done += lines
        now = time.monotonic()
        tty = sys.stderr.isatty()
        if self.done < self.total and now - self.shown < (0.2 if tty else 5.0):
            return
        self.shown = now
        rate = self.done / max(now - self.started, 1e-9)
        print(("\r" if tty else "") + f"translated {self.done:,} of {self.total:,} lines "
              f"({100 * self.done / max(self.total, 1):.0f}%), {rate:,.0f} lines/s", end="" if tty else "\n",
              file=sys.stderr, flush=True)
        if tty and self.done >= self.total:
            print(file=sys.stderr)


@dataclass(frozen=True)
class Summary:
    lines: int
    batches: int
    resumed: int  # batches already done by an earlier run
    engine: str
    seconds: float


def read_lines(path: Path, data: bytes) -> list[str]:
    """The lines of a file's bytes (`path` names it in errors)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line} is not UTF-8 text") from None
    # lines end at \n alone (and a \r before it): str.splitlines would also split at \x0c, \x85, \u2028...
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def checked_sources(rt: Runtime, lines: Sequence[str], gen: GenerationConfig, as_ids: bool) -> list[list[int] | None]:
    """Each line as token ids (None for a blank one), every line checked before any runs."""
    found: list[list[int] | None] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            found.append(None)
            continue
        try:
            if as_ids or rt.tokenizer is None:
                try:
                    ids = parse_ids(line)
                except ValueError:
                    raise InputError("not space-separated token ids (the bundle has no tokenizer, or --ids was "
                                     "given)") from None
            else:
                ids = rt.tokenize([line])[0]
            found.append(rt.check_inputs([ids], gen)[0])
        except InputError as e:
            raise InputError(f"line {number}: {e}") from None
    return found


def translate(bundle: Path | str, source: Path | str, output: Path | str, gen: GenerationConfig | None = None,
              batch_size: int = 32, engine: str = "auto", replicas: int = 1, as_ids: bool = False,
              threads: int | None = None, limits: Limits | None = None, force: bool = False,
              settings: Mapping[str, Any] | None = None, log: Callable[[str], None] = print) -> Summary:
    """Translate the lines of `source` into `output`, resuming a run that stopped (its parts in OUTPUT.parts).
    gen: the settings (default: the bundle's), and `settings` the fields to change in them (the CLI's flags). One
    run of an output at a time: a second is refused while the first holds the output's lock."""
    start = time.monotonic()
    source, output, limits = Path(source), Path(output), limits or Limits()
    if engine not in ENGINES:
        raise InputError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if not 1 <= batch_size <= limits.rows:
        raise InputError(f"--batch-size {batch_size}: give a size in [1, {limits.rows}] (--limit-rows)")
    if output.exists() and not force:
        raise InputError(f"{output} exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent} is not a folder: create it first")
    rt = Runtime(bundle, threads=threads, limits=limits)
    if not hasattr(rt, "generate"):
        raise InputError(f"{bundle} is an image classifier's bundle; translate runs bundles that generate")
    gen = replace(gen or rt.generation, **(settings or {}))
    if gen.strategy == "sample" and gen.seed is None:
        raise InputError("sampling without a seed: a resumed run would not match; give --seed")
    if batch_size * gen.rows_per_input > limits.rows:
        raise InputError(f"--batch-size {batch_size} x {gen.rows_per_input} beams or samples are "
                         f"{batch_size * gen.rows_per_input} rows, above the limit of {limits.rows}; lower "
                         "--batch-size")
    try:
        data = source.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {source}: {e.strerror or e}") from None
    lines = read_lines(source, data)
    src = checked_sources(rt, lines, gen, as_ids)
    order = sorted((i for i, s in enumerate(src) if s is not None), key=lambda i: (len(src[i] or ()), i))
    batches = [order[k: k + batch_size] for k in range(0, len(order), batch_size)]
    key = _run_key(data, Path(bundle), gen, batch_size, as_ids)
    use_ray = engine == "ray" or (engine == "auto" and _ray_installed())
    with writer_lock(output):
        parts = _parts_of(output, key, len(batches))
        pending = [k for k in range(len(batches)) if _part(parts, k, len(batches[k])) is None]
        resumed = len(batches) - len(pending)
        log(f"translating {len(order):,} lines of {source} in {len(batches):,} batches"
            + (f", resuming: {resumed:,} already done" if resumed else "")
            + (f", on Ray Data with {replicas} actor{'s' if replicas > 1 else ''}" if use_ray
               else ", in this process"))
        progress = Progress(len(order))
        waiting = set(pending)
        progress.add(sum(len(batches[k]) for k in range(len(batches)) if k not in waiting))

        def finished(k: int, done: list[str]) -> None:  # a batch's lines, on disk before they are counted
            write_file(part_path(parts, k), json.dumps(done))
            progress.add(len(done))

        work = Work(str(Path(bundle).resolve()), gen, as_ids,
                    actor_threads(threads, ACTOR_CPUS) if use_ray else threads, limits)
        if not use_ray:
            for k in pending:
                finished(k, work.run(rt, k, [src[i] or [] for i in batches[k]]))
        elif pending:
            _on_ray(work, [(k, [src[i] for i in batches[k]]) for k in pending], replicas, finished)

        translated = [""] * len(lines)
        for k, batch in enumerate(batches):
            done = _part(parts, k, len(batch))
            if done is None:
                raise EdgeformerError(f"{part_path(parts, k)} is missing or cut short; run again to redo it")
            for i, line in zip(batch, done, strict=True):
                translated[i] = line
        write_file(output, "".join(line + "\n" for line in translated))
        shutil.rmtree(parts)
    return Summary(len(order), len(batches), resumed, "ray" if use_ray else "local", time.monotonic() - start)


def _run_key(data: bytes, bundle: Path, gen: GenerationConfig, batch_size: int, as_ids: bool) -> str:
    """What a run's parts belong to: the input, the bundle (its manifest, which hashes every file) and how it runs."""
    manifest = bundle / MANIFEST_FILE
    model = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else str(bundle.resolve())
    record = {"source": hashlib.sha256(data).hexdigest(), "manifest": model, "gen": gen.to_dict(),
              "batch_size": batch_size, "as_ids": as_ids}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _parts_of(output: Path, key: str, batches: int) -> Path:
    """OUTPUT.parts: made with its run's record, or found holding this run's (another run's is refused)."""
    parts = output.with_name(output.name + ".parts")
    if parts.is_dir() and not any(parts.iterdir()):  # made by a run stopped before it wrote anything
        parts.rmdir()
    if not parts.is_dir():
        parts.mkdir()
        write_file(parts / JOB_FILE, json.dumps({"key": key, "batches": batches}))
        return parts
    try:
        recorded = json.loads((parts / JOB_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded != key:
        raise InputError(f"{parts} holds a run of another input, bundle or settings; remove it to start over")
    return parts


def _ray_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _part(parts: Path, k: int, lines: int) -> list[str] | None:
    """A finished batch's lines, or None where its part is missing or is not `lines` lines (a run cut off while
    writing it: done again)."""
    try:
        done = json.loads(part_path(parts, k).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(done, list) and len(done) == lines and all(isinstance(line, str) for line in done)
    return done if ok else None


def _on_ray(work: Work, pending: list[tuple[int, list[Any]]], replicas: int,
            finished: Callable[[int, list[str]], None]) -> None:
    """The pending batches through a pool of Translator actors on Ray Data (a cluster with RAY_ADDRESS)."""
    import logging

    import ray.data

    from edgeformer.serve.cluster import init_ray

    init_ray(logging_level=logging.WARNING, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress bars and plan: ours counts lines
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    items = [{"batch": k, "src": json.dumps(src)} for k, src in pending]
    done = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * replicas)).map_batches(
        Translator, fn_constructor_args=(work,), batch_size=1, concurrency=replicas, num_cpus=ACTOR_CPUS)
    for row in done.iter_rows():
        finished(int(row["batch"]), json.loads(row["lines"]))
