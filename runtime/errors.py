"""The errors edgeformer raises on purpose. Each message names the problem and how to fix it; an exception of any
other type escaping edgeformer is a bug (tests/test_hardening.py feeds it random bundles and inputs to show none
does). Every class is also a built-in exception, so code that catches ValueError or RuntimeError still works."""

from __future__ import annotations


class EdgeformerError(Exception):
    """The base of every error below: `except EdgeformerError` catches all that edgeformer raises on purpose."""


class BundleError(EdgeformerError, ValueError):
    """A bundle (or checkpoint) that cannot be used: the message names the file and the problem."""


class InputError(EdgeformerError, ValueError):
    """Inputs or settings that cannot be used, of the wrong type as much as of the wrong value."""


class LimitError(InputError):
    """Inputs or settings above a limit: the model's (its learned positions) or the runtime's (`Limits`)."""


class EngineError(EdgeformerError, RuntimeError):
    """onnxruntime failed on a graph that passed every check (out of memory, a provider's fault)."""


class WriteError(EdgeformerError, OSError):
    """A bundle or checkpoint that cannot be written now: another process is writing the same folder."""


class ProviderFallback(UserWarning):
    """A provider asked for that cannot be had here, or cannot take a graph: the message says which and why, and the
    runtime goes on with the next choice (the CPU last). Runtime.provider_notes keeps them."""
