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
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeformer.runtime.families import DEFAULT_FAMILY, get_family
from edgeformer.runtime.spec import GraphSpec

MANIFEST_FILE = "edgeformer.json"
FORMAT_NAME = "edgeformer-bundle"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and the problem."""


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it into place only if the block succeeds."""
    target = Path(target)
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass force=True (--force) to replace it")
    parent = target.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any other folder
    except OSError as e:
        raise OSError(f"cannot write {target}: {e.strerror or e}") from None
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def producer_versions() -> dict[str, str]:
    """The versions of the packages that make bundles, as the manifest records them (those installed)."""
    versions = {}
    for package in ("edgeformer", "torch", "onnx", "onnxruntime", "onnxscript", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    config: dict[str, Any]  # the model's config, as config.json holds it
    graphs: dict[str, GraphSpec]
    graph_files: dict[str, str]  # graph name -> file in the bundle
    variant: str = "fp32"
    opset: int = 18
    tokenizer: str | None = None  # file in the bundle, if the model has one
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256
    producer: dict[str, str] = field(default_factory=dict)  # package -> version
    parity: dict[str, Any] = field(default_factory=dict)  # figures measured before the bundle was written
    exporter: str = ""
    transforms: list[dict[str, Any]] = field(default_factory=list)  # optimize/quantize steps, in order
    variant_parity: dict[str, Any] = field(default_factory=dict)  # a derived variant against its fp32 source
    generation: dict[str, Any] = field(default_factory=dict)  # default GenerationConfig settings (an importer's)
    family: str = DEFAULT_FAMILY  # the model family (runtime/families.py), which declares the graphs
    task: str | None = None  # the built-in task the model was trained on, if it was: variants are judged on it
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

    def bytes(self, folder: Path) -> int:
        """Size on disk of the bundle in `folder` (the one this manifest was loaded from or saved to): the manifest
        and the files it lists."""
        return sum((Path(folder) / f).stat().st_size for f in (MANIFEST_FILE, *self.files))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "family": self.family,
            "variant": self.variant,
            "task": self.task,
            "config": self.config,
            "max_positions": self.max_positions,
            "opset": self.opset,
            "exporter": self.exporter,
            "graphs": {name: {"file": self.graph_files[name], **spec.to_dict()} for name, spec in self.graphs.items()},
            "tokenizer": self.tokenizer,
            "files": self.files,
            "producer": self.producer,
            "parity": self.parity,
            "transforms": self.transforms,
            "variant_parity": self.variant_parity,
            "generation": self.generation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: Path) -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise BundleError(f"{where}: not an edgeformer manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"{where}: bundle format version {version} is not supported by this runtime, which "
                              f"reads version {FORMAT_VERSION}; upgrade edgeformer (or re-export with this one)")
        try:
            try:
                family = get_family(d.get("family", DEFAULT_FAMILY))
            except ValueError as e:
                raise BundleError(f"{where}: {e}") from None
            graphs = {name: GraphSpec.from_dict(name, g) for name, g in d["graphs"].items()}
            missing = [g for g in family.graph_files if g not in graphs]
            if missing:
                raise BundleError(f"{where}: the manifest declares no {', '.join(missing)} graph, which every "
                                  f"{family.name} bundle has")
            return cls(config=d["config"], graphs=graphs, graph_files={n: g["file"] for n, g in d["graphs"].items()},
                       variant=d["variant"], opset=d["opset"], tokenizer=d.get("tokenizer"), files=d["files"],
                       producer=d.get("producer", {}), parity=d.get("parity", {}), exporter=d.get("exporter", ""),
                       transforms=d.get("transforms", []), variant_parity=d.get("variant_parity", {}),
                       generation=d.get("generation", {}), family=family.name, task=d.get("task"),
                       format_version=version)
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: malformed manifest, missing or wrong field {e}") from None

    def save(self, folder: Path) -> None:
        """Record the sha256 of every other file in the folder, then write the manifest."""
        folder = Path(folder)
        self.files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
                      if p.is_file() and p.name != MANIFEST_FILE}
        (folder / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, verify: bool = True) -> Manifest:
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not folder.is_dir():
            raise BundleError(f"{folder}: no such bundle folder; create one with `edgeformer export`")
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise BundleError(f"{path}: missing; is {folder} a bundle written by `edgeformer export`?") from None
        except json.JSONDecodeError as e:
            raise BundleError(f"{path}: not valid JSON ({e})") from None
        manifest = cls.from_dict(d, path)
        if verify:
            manifest.verify(folder)
        return manifest

    def verify(self, folder: Path) -> None:
        """Every file the manifest lists is there with its recorded sha256."""
        for name in (*self.graph_files.values(), *([self.tokenizer] if self.tokenizer else [])):
            if name not in self.files:
                raise BundleError(f"{folder / MANIFEST_FILE}: {name} has no recorded sha256")
        for name, digest in self.files.items():
            path = Path(folder) / name
            if not path.is_file():
                raise BundleError(f"{path}: missing from the bundle (the manifest lists it)")
            if sha256_file(path) != digest:
                raise BundleError(f"{path}: sha256 does not match the manifest; the file was changed or "
                                  "corrupted after export, export the bundle again")
