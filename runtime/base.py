"""What every runtime of a bundle shares, whatever its family: the arguments it is given, checked before the folder
is read, and its sessions opened on the providers asked (runtime/providers.py), a choice passed over a warning."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import onnxruntime as ort

from edgeformer.runtime.engine import open_first, session_options
from edgeformer.runtime.errors import InputError, ProviderFallback
from edgeformer.runtime.options import Limits, is_int
from edgeformer.runtime.providers import GPU_MEMORY, assignment, caller_level, placements

MAX_THREADS = 1024  # onnxruntime takes an int32; no machine this runs on has more cores


class OnProviders:
    """A bundle's sessions on the providers asked. Subclasses set `manifest` (or answer `variant` and `misses`)."""

    manifest: Any

    def _take_arguments(self, bundle: Path | str, providers: Sequence[str], threads: int | None, optimization: str,
                        decoder_threads: int | None, limits: Limits | None) -> None:
        """Check what every runtime is given, before the folder is read; keep the path, limits and providers."""
        for name, value in (("threads", threads), ("decoder_threads", decoder_threads)):
            if value is not None and (not is_int(value) or not 1 <= value <= MAX_THREADS):
                raise InputError(f"{name}={value!r}: give a number of threads in [1, {MAX_THREADS}], or None for "
                                 "the default")
        if limits is not None and not isinstance(limits, Limits):
            raise InputError(f"limits must be a Limits, not {type(limits).__name__}")
        if not isinstance(bundle, (str, PathLike)):
            raise InputError(f"bundle must be a folder's path, not {type(bundle).__name__}")
        self.limits = limits or Limits()
        # where the sessions may go, best first (the CPU last), and why the choices left out were
        self.placements, self.provider_notes = placements(providers)
        self._warned = 0
        self._opening = threading.Lock()
        self.assigned: dict[str, dict[str, int]] = {}  # graph file -> nodes per provider, where not all on the CPU
        session_options(optimization)  # an unknown level is refused before the folder is read
        self.path = Path(bundle)

    @property
    def variant(self) -> str:
        """What the folder holds: the bundle's variant (fp32, int8...)."""
        return self.manifest.variant

    @property
    def misses(self) -> list[str]:
        """The targets a bundle written with --allow-drop missed."""
        return self.manifest.misses

    def _open_file(self, path: Path, make_options: Any, cpu_unfused: tuple[str, ...] = ()) -> ort.InferenceSession:
        """A session on the first placement that takes the graph (on the CPU without the fusions `cpu_unfused`
        names); a choice passed over is a warning (and a note in provider_notes), once."""
        session = open_first(path, make_options, self.placements, self.provider_notes, cpu_unfused)
        taken = assignment(session)
        if taken:
            self.assigned[path.name] = taken
        for note in self.provider_notes[self._warned:]:
            warnings.warn(ProviderFallback(note), stacklevel=caller_level())
        self._warned = len(self.provider_notes)
        return session

    def _placed(self, session: ort.InferenceSession) -> None:
        """The provider that runs most of `session`'s nodes (else the first it lists), and where its outputs stay:
        on the device of the provider asked, where it took any of them (a GPU provider leaves shape arithmetic to
        the CPU, and its cache still stays on the GPU)."""
        taken = assignment(session)
        self.provider = max(taken, key=lambda p: taken[p]) if taken else session.get_providers()[0]
        placement = self.placements[0]
        runs = placement.provider in (taken or session.get_providers())
        self.device = GPU_MEMORY.get(placement.provider, "cpu") if runs else "cpu"
        self.device_id = placement.device_id if runs else 0
