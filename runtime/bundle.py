"""The bundle: a folder with `edgeformer.json` (the manifest), the ONNX graphs and the tokenizer.

The runtime knows a bundle only through its manifest. Loading checks the format version, the sha256 of every
file, and that each graph's inputs and outputs are those the manifest declares.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeformer.runtime.errors import BundleError, WriteError
from edgeformer.runtime.families import DEFAULT_FAMILY, get_family
from edgeformer.runtime.onnx_refs import external_locations
from edgeformer.runtime.spec import GraphSpec
from edgeformer.runtime.tokenizer import TOKENIZER_FILE

__all__ = ["FORMAT_VERSION", "MANIFEST_FILE", "BundleError", "Listed", "Manifest", "atomic_folder", "write_file",
           "writer_lock"]

MANIFEST_FILE = "edgeformer.json"
FORMAT_NAME = "edgeformer-bundle"
# 4: the decoder's cross-attention cache and source mask are per source, its other inputs and outputs per row
# (a source's beams share them), and `cache` says how the self-attention cache is passed; 3: the decoder has a
# search head (logits_mask, top_k -> top_log_probs, top_ids); 2: every listed file has its size, checked before it
# is hashed; 1: sha256 alone
FORMAT_VERSION = 4
MANIFEST_LIMIT = 16 << 20  # bytes: a manifest is a few kB; a larger one is not read at all
GRAPH_LIMIT = 2 << 30  # bytes: protobuf's limit, so no ONNX graph file is larger (weights beyond it are external)


# -- writing: one writer per folder, nothing half-written, what a killed writer left recovered -----------------


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; when the block succeeds, flush it to disk and rename it
    into place, replacing what is there only with `force`.

    One writer at a time: a second one (another process) is refused while the first holds `.NAME.lock`. Under the
    lock, what a killed writer left is dealt with first: its temporary folders are removed, and a replace it did
    not finish is undone (the old folder, moved aside to `.NAME.old`, is put back)."""
    target = Path(target).absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot write {target}: {e.strerror or e}") from None
    with writer_lock(target) as locked:
        if locked:
            _recover(target)
        if target.exists() and not force:
            raise FileExistsError(f"{target} already exists; pass force=True (--force) to replace it")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.edgeformer-", suffix=".tmp", dir=target.parent))
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should look like any other folder
        except OSError as e:
            raise OSError(f"cannot write {target}: {e.strerror or e}") from None
        try:
            yield tmp
            _flush(tmp)
            if target.exists():
                old = _old(target)
                os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except BaseException:  # put the old one back; a crash right here is undone by the next _recover
                    os.replace(old, target)
                    raise
                _flush_folder(target.parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
                _flush_folder(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def as_new_file(path: Path) -> None:
    """Give a file the mode a file the process creates gets (onnx writes external data readable by its owner only)."""
    path.chmod(0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without setting it where the system tells (Linux): setting it, even for an
    instant, changes it for every thread."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _is_temporary(name: str, target: Path) -> bool:
    """A folder that atomic_folder makes for `target` (mkdtemp's eight random characters)."""
    return re.fullmatch(re.escape(f".{target.name}.edgeformer-") + r"[a-z0-9_]{8}\.tmp", name) is not None


def _recover(target: Path) -> None:
    """Undo what a writer of `target` that was killed left behind. Called with the lock held: no writer is live."""
    old = _old(target)
    if old.exists():
        if target.exists():  # killed after the replace, before removing the old folder
            shutil.rmtree(old, ignore_errors=True)
        else:  # killed between the two renames: the old bundle is all there is
            os.replace(old, target)
    for stale in target.parent.iterdir():
        if _is_temporary(stale.name, target):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def writer_lock(target: Path) -> Iterator[bool]:
    """Hold `.NAME.lock` beside `target` (flock, released by the kernel if the process dies); removed on release.
    Where fcntl does not exist (Windows) writers are not serialized, and what a killed writer left stays: without
    the lock, another writer's folders cannot be told from a dead one's."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    lock = target.with_name(f".{target.name}.lock")
    for _ in range(10):
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriteError(f"{target}: another process is writing it now (it holds {lock.name}); wait for it to "
                             "finish, then try again") from None
        try:  # the lock file may have been removed and made anew between our open and our flock: lock that one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise WriteError(f"{target}: could not take {lock.name}; another process keeps replacing it")
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def write_file(path: Path, text: str) -> None:
    """Replace `path` with `text`, whole or not at all: a temporary file beside it, on disk (fsync) before it is
    renamed into place, and the rename on disk too."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _flush_folder(path.parent)


def _flush(folder: Path) -> None:
    """Every file in `folder` on disk, then the folder itself: a rename must never publish data still in cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _flush_folder(folder)


def _flush_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some systems (Windows) cannot open a folder to flush it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


PRODUCERS = ("edgeformer", "torch", "onnx", "onnxruntime", "onnxscript", "numpy")


def producer_versions(packages: tuple[str, ...] = PRODUCERS) -> dict[str, str]:
    """The versions of the packages that make bundles (or of `packages`), as the manifest records them: those
    installed."""
    versions = {}
    for package in packages:
        # a module's own version first: onnxruntime-gpu installs `onnxruntime` under another distribution's name, and
        # the CPU wheel's metadata may remain beside it
        version = getattr(sys.modules.get(package), "__version__", None)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version = version or importlib.metadata.version(package)
        if version:
            versions[package] = str(version)
    return versions


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plain_name(name: object, what: str, where: Path) -> str:
    """A file name a manifest may give: one name in the bundle folder, never a path (no separators, no `..`)."""
    try:
        encoded = name.encode("utf-8") if isinstance(name, str) else None
    except UnicodeEncodeError:  # a lone surrogate: no file system takes it
        encoded = None
    if (encoded is None or name in ("", ".", "..") or b"/" in encoded or b"\\" in encoded or b"\0" in encoded
            or len(encoded) > 255):
        raise BundleError(f"{where}: {what} {name!r} is not a plain file name; a bundle names only files inside its "
                          "own folder")
    return str(name)


def inside(folder: Path, name: str) -> Path:
    """The regular file `name` in `folder`, symlinks resolved, refused unless it stays inside the folder."""
    try:
        root = Path(folder).resolve()
        path = (root / name).resolve()
        if path.parent != root and root not in path.parents:
            raise BundleError(f"{root / name}: leads outside the bundle (to {path}); a bundle reads only its own "
                              "files")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BundleError(f"{Path(folder) / name}: missing from the bundle (the manifest lists it)") from None
    except (OSError, RuntimeError) as e:  # no permission, a symlink loop (RuntimeError before Python 3.13)
        raise BundleError(f"{Path(folder) / name}: cannot be read ({e})") from None
    if not stat.S_ISREG(mode):
        raise BundleError(f"{root / name}: not a regular file")
    return path


@dataclass(frozen=True)
class Listed:
    """A file the manifest lists: its sha256, and its size, checked before it is hashed."""

    sha256: str
    bytes: int


def _expect(value: Any, kind: type | tuple[type, ...], what: str, where: Path) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BundleError(f"{where}: malformed manifest: {what} must be {names}, not {type(value).__name__}")
    return value


@dataclass
class Manifest:
    config: dict[str, Any]  # the model's config, as config.json holds it
    graphs: dict[str, GraphSpec]
    graph_files: dict[str, str]  # graph name -> file in the bundle
    variant: str = "fp32"
    opset: int = 18
    tokenizer: str | None = None  # TOKENIZER_FILE, if the model has a tokenizer
    files: dict[str, Listed] = field(default_factory=dict)  # every file in the bundle but the manifest
    producer: dict[str, str] = field(default_factory=dict)  # package -> version
    parity: dict[str, Any] = field(default_factory=dict)  # figures measured before the bundle was written
    exporter: str = ""
    transforms: list[dict[str, Any]] = field(default_factory=list)  # optimize/quantize steps, in order
    variant_parity: dict[str, Any] = field(default_factory=dict)  # a derived variant against its fp32 source
    generation: dict[str, Any] = field(default_factory=dict)  # default GenerationConfig settings (an importer's)
    family: str = DEFAULT_FAMILY  # the model family (runtime/families.py), which declares the graphs
    cache: str = "concat"  # how the graphs pass a cache: one of the family's `caches` (runtime/encoder_decoder.py)
    task: str | None = None  # the built-in task the model was trained on, if it was: variants are judged on it
    search: dict[str, Any] | None = None  # the one-graph search, if the bundle has one: strategy, early_stopping
    format_version: int = FORMAT_VERSION

    @property
    def offline_optimization(self) -> str | None:
        """The onnxruntime level the graphs were optimized at offline, if they were."""
        levels = [t["level"] for t in self.transforms if t.get("step") == "optimize"]
        return levels[-1] if levels else None

    @property
    def max_positions(self) -> int | None:
        """Learned position tables bound the length of sources and targets; sinusoidal ones do not."""
        return int(self.config["max_positions"]) if self.config.get("position") == "learned" else None

    @property
    def misses(self) -> list[str]:
        """The targets a variant written with --allow-drop missed (none for one that met them)."""
        return list(self.variant_parity.get("misses") or [])

    def bytes(self, folder: Path) -> int:
        """Size on disk of the bundle in `folder` (the one this manifest was loaded from or saved to): the manifest
        and the files it lists."""
        return sum((Path(folder) / f).stat().st_size for f in (MANIFEST_FILE, *self.files))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "cache": self.cache,
            "variant": self.variant,
            "task": self.task,
            "config": self.config,
            "max_positions": self.max_positions,
            "opset": self.opset,
            "exporter": self.exporter,
            "graphs": {name: {"file": self.graph_files[name], **spec.to_dict()} for name, spec in self.graphs.items()},
            "tokenizer": self.tokenizer,
            "files": {name: {"sha256": f.sha256, "bytes": f.bytes} for name, f in self.files.items()},
            "producer": self.producer,
            "parity": self.parity,
            "transforms": self.transforms,
            "variant_parity": self.variant_parity,
            "generation": self.generation,
            **({"search": self.search} if self.search else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, where: Path) -> Manifest:
        """Read a manifest, checking every field the code acts on: a malformed one is a BundleError that names
        the field, never a KeyError or TypeError from deep inside."""
        _expect(d, dict, "the manifest", where)
        if d.get("format") != FORMAT_NAME:
            raise BundleError(f"{where}: not an edgeformer manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION or type(version) is not int:
            raise BundleError(f"{where}: bundle format version {version!r} is not supported by this runtime, which "
                              f"reads version {FORMAT_VERSION}; export the bundle again with this edgeformer (or "
                              "upgrade edgeformer, for a newer bundle)")
        try:
            family = get_family(_expect(d.get("family", DEFAULT_FAMILY), str, "family", where))
        except ValueError as e:
            raise BundleError(f"{where}: {e}") from None
        config = _expect(d.get("config"), dict, "config", where)
        problems = family.check_config(config)
        if problems:
            raise BundleError(f"{where}: the model config is not usable: {'; '.join(problems)}")
        cache = _expect(d.get("cache", family.caches[0]), str, "cache", where)
        if cache not in family.caches:
            raise BundleError(f"{where}: cache {cache!r} is not one a {family.name} bundle may have "
                              f"({', '.join(family.caches)})")
        search = _expect(d.get("search"), (dict, type(None)), "search", where)
        if search is not None and (search.get("strategy") not in family.searches
                                   or not isinstance(search.get("early_stopping"), bool)):
            raise BundleError(f"{where}: malformed manifest: search must give a strategy of "
                              f"{', '.join(family.searches) or 'none'} and early_stopping true or false")
        graphs, graph_files = {}, {}
        for name, g in _expect(d.get("graphs"), dict, "graphs", where).items():
            _expect(g, dict, f"graphs.{name}", where)
            graph_files[name] = plain_name(g.get("file"), f"graph {name}'s file", where)
            try:
                graphs[name] = GraphSpec.from_dict(name, g)
            except (KeyError, TypeError, ValueError) as e:
                raise BundleError(f"{where}: malformed manifest: graph {name}'s inputs or outputs ({e})") from None
        expected = family.graphs(config, cache=cache, **({"search": search["strategy"]} if search else {}))
        if set(graphs) != set(expected):
            raise BundleError(f"{where}: a {family.name} bundle has the graphs {', '.join(expected)}; this manifest "
                              f"declares {', '.join(graphs) or 'none'}")
        for name, spec in graphs.items():
            if _unordered(spec.signature()) != _unordered(expected[name].signature()):
                raise BundleError(f"{where}: the {name} graph's declared inputs and outputs are not those of a "
                                  f"{family.name} model with this config")
        files = {}
        for name, entry in _expect(d.get("files"), dict, "files", where).items():
            plain_name(name, "listed file", where)
            _expect(entry, dict, f"files.{name}", where)
            size = _expect(entry.get("bytes"), int, f"files.{name}.bytes", where)
            files[name] = Listed(_expect(entry.get("sha256"), str, f"files.{name}.sha256", where), size)
        tokenizer = d.get("tokenizer")
        if tokenizer is not None and tokenizer != TOKENIZER_FILE:
            raise BundleError(f"{where}: the tokenizer is {tokenizer!r}; a bundle's tokenizer is {TOKENIZER_FILE}")
        for name in (*graph_files.values(), *([tokenizer] if tokenizer else [])):
            if name not in files:
                raise BundleError(f"{where}: {name} is not among the listed files, so it cannot be checked")
        transforms = _expect(d.get("transforms", []), list, "transforms", where)
        for t in transforms:
            _expect(t, dict, "each transform", where)
            if t.get("step") == "optimize":
                _expect(t.get("level"), str, "an optimize step's level", where)
        variant_parity = _expect(d.get("variant_parity", {}), dict, "variant_parity", where)
        misses = _expect(variant_parity.get("misses") or [], list, "variant_parity.misses", where)
        for miss in misses:
            _expect(miss, str, "each of variant_parity.misses", where)
        producer = _expect(d.get("producer", {}), dict, "producer", where)
        return cls(config=config, graphs=graphs, graph_files=graph_files,
                   variant=_expect(d.get("variant"), str, "variant", where),
                   opset=_expect(d.get("opset"), int, "opset", where), tokenizer=tokenizer, files=files,
                   producer={str(k): str(v) for k, v in producer.items()},
                   parity=_expect(d.get("parity", {}), dict, "parity", where),
                   exporter=str(d.get("exporter", "")), transforms=transforms, variant_parity=variant_parity,
                   generation=_expect(d.get("generation", {}), dict, "generation", where), family=family.name,
                   cache=cache, task=_expect(d.get("task"), (str, type(None)), "task", where), search=search,
                   format_version=version)

    def save(self, folder: Path) -> None:
        """Record the size and sha256 of every other file in the folder, then write the manifest."""
        folder = Path(folder)
        self.files = {p.name: Listed(sha256_file(p), p.stat().st_size) for p in sorted(folder.iterdir())
                      if p.is_file() and p.name != MANIFEST_FILE}
        self.write(folder)

    def write(self, folder: Path) -> None:
        """Write the manifest as it is, its list of files included (after `save` listed them)."""
        (Path(folder) / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, folder: Path, verify: bool = True) -> Manifest:
        """Read and check the manifest of the bundle in `folder`, then its files (see `check`)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise BundleError(f"{folder}: no such bundle folder; create one with `edgeformer export`")
        path = folder / MANIFEST_FILE
        if not path.exists():
            raise BundleError(f"{path}: missing; is {folder} a bundle written by `edgeformer export`?")
        path = inside(folder, MANIFEST_FILE)
        try:
            size = path.stat().st_size
            if size > MANIFEST_LIMIT:
                raise BundleError(f"{path}: {size} bytes, more than a manifest can be ({MANIFEST_LIMIT} bytes); "
                                  "not read")
            d = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
        except OSError as e:
            raise BundleError(f"{path}: cannot be read ({e})") from None
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, NaN, nesting too deep
            raise BundleError(f"{path}: not valid JSON ({str(e)[:200]})") from None
        manifest = cls.from_dict(d, path)
        manifest.check(folder, verify)
        return manifest

    def check(self, folder: Path, verify: bool = True) -> None:
        """Every listed file is inside the bundle, a regular file, of its recorded size and (with `verify`) its
        recorded sha256; every file a graph reads as external data is one of them. Sizes are checked before any
        file is read, and nothing the manifest does not list is opened."""
        paths = {name: inside(folder, name) for name in self.files}
        for name, listed in self.files.items():
            size = paths[name].stat().st_size
            if size != listed.bytes:
                raise BundleError(f"{paths[name]}: {size} bytes, the manifest records {listed.bytes}; the file was "
                                  "changed or cut short after export, export the bundle again")
            if name in self.graph_files.values() and size > GRAPH_LIMIT:
                raise BundleError(f"{paths[name]}: {size} bytes, more than an ONNX graph can be ({GRAPH_LIMIT})")
        try:
            graphs = {name: paths[name].read_bytes() for name in set(self.graph_files.values())}  # read once
            digests = {name: hashlib.sha256(graphs[name]).hexdigest() if name in graphs else sha256_file(paths[name])
                       for name in self.files} if verify else {}
        except OSError as e:
            raise BundleError(f"{folder}: a listed file cannot be read ({e})") from None
        for name, digest in digests.items():
            if digest != self.files[name].sha256:
                raise BundleError(f"{paths[name]}: sha256 does not match the manifest; the file was changed or "
                                  "corrupted after export, export the bundle again")
        for graph, name in self.graph_files.items():
            try:
                locations = external_locations(graphs[name])
            except ValueError as e:
                raise BundleError(f"{paths[name]}: not an ONNX graph ({e})") from None
            for location in sorted(locations):
                if location not in self.files:
                    raise BundleError(f"{paths[name]}: the {graph} graph reads external data from {location!r}, "
                                      "which is not a file the manifest lists; it is not read")


def _unordered(signature: tuple) -> tuple:
    """A graph's signature whatever the order of its tensors: bundles made before the decoder took its caches layer
    by layer list them in another order, and the runtime binds them by name."""
    return tuple(tuple(sorted(tensors)) for tensors in signature)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")
