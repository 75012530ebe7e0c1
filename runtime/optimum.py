"""Hugging Face Optimum's seq2seq folders, run by the runtime with numpy and onnxruntime alone.

`optimum-cli export onnx --task text2text-generation-with-past` (and `edgeformer export --layout optimum`) writes
an encoder (`input_ids`, `attention_mask` -> `last_hidden_state`), a decoder for the first step (it takes
`encoder_hidden_states` and returns the cross-attention cache with the self-attention one), one for the steps after
(the past in, per layer: self key, self value, cross key, cross value), or both in one merged graph that switches on
`use_cache_branch`, beside the model's `config.json` and `generation_config.json`. `Runtime(folder)` reads such a
folder: what it runs is the graphs' contract, checked when they open; what it decodes by is the generation
settings, those it has no rule for refused by name (runtime/hf_generation.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgeformer.runtime.bundle import GRAPH_LIMIT, MANIFEST_LIMIT, inside, plain_name, sha256_file
from edgeformer.runtime.encoder_decoder import is_self_cache
from edgeformer.runtime.engine import ORT_ERRORS, graph_io, session_options
from edgeformer.runtime.errors import BundleError, EngineError, InputError
from edgeformer.runtime.hf_generation import from_hugging_face, unsupported
from edgeformer.runtime.onnx_refs import external_locations
from edgeformer.runtime.options import GenerationConfig, Limits
from edgeformer.runtime.search import StepModel
from edgeformer.runtime.session import Runtime, host, log_softmax
from edgeformer.runtime.tokenizer import KINDS, MARIAN_FILES, MarianTokenizer, Tokenizer

ENCODER_FILE, MERGED_FILE = "encoder_model.onnx", "decoder_model_merged.onnx"
DECODER_FILE, WITH_PAST_FILE = "decoder_model.onnx", "decoder_with_past_model.onnx"
CONFIG_FILE, GENERATION_FILE = "config.json", "generation_config.json"
HIDDEN, BRANCH = "last_hidden_state", "use_cache_branch"
# What a step feeds besides the caches; a decoder that asks for anything else (a decoder attention mask, cache
# positions) follows a contract this runtime does not know, and is refused by name.
STEP_INPUTS = ("input_ids", "encoder_attention_mask", "encoder_hidden_states", BRANCH)
# Written by `edgeformer export --layout optimum` into config.json: the files' sha256, the export's check figures.
OURS = "edgeformer"


def is_optimum_folder(folder: Path) -> bool:
    """A folder in Optimum's seq2seq layout (and no edgeformer bundle)."""
    return bool(_suffixes(folder)) and (folder / CONFIG_FILE).is_file() and not (folder / "edgeformer.json").exists()


def _suffixes(folder: Path) -> list[str]:
    """The graph sets a folder holds, by the suffix Optimum's tools give their names: "" for the export,
    "_quantized" for ORTQuantizer's, and so on (`encoder_model{suffix}.onnx`)."""
    stem = ENCODER_FILE.removesuffix(".onnx")
    try:
        found = [p.name[len(stem): -len(".onnx")] for p in folder.glob(f"{stem}*.onnx")]
    except OSError:
        return []
    return sorted(found)


def _suffixed(name: str, suffix: str) -> str:
    return name.removesuffix(".onnx") + suffix + ".onnx"


def _json(folder: Path, name: str) -> dict[str, Any]:
    path = inside(folder, name)
    if path.stat().st_size > MANIFEST_LIMIT:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, too large for a configuration; it is not read")
    try:
        found = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{path}: not a JSON configuration ({str(e)[:200]})") from None
    if not isinstance(found, dict):
        raise BundleError(f"{path}: a configuration is a JSON object")
    return found


def _token(settings: dict[str, Any], config: dict[str, Any], key: str, where: Path) -> int:
    value = settings.get(key, config.get(key))
    if isinstance(value, list) and len(value) == 1:  # eos_token_id may be a list of one
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BundleError(f"{where}: {key} must be one token id, not {value!r}; this runtime decodes with one"
                          + (" (several EOS ids are not supported)" if isinstance(value, list) else ""))
    return value


def _checked_graph(folder: Path, name: str, listed: dict[str, str] | None) -> Path:
    """The graph file `name`, refused unless it and every file it reads as external data stay inside the folder
    (and, for a folder of ours, match their recorded sha256)."""
    path = inside(folder, plain_name(name, "graph file", folder))
    if path.stat().st_size > GRAPH_LIMIT:
        raise BundleError(f"{path}: more than an ONNX graph can be ({GRAPH_LIMIT} bytes)")
    try:
        locations = external_locations(path.read_bytes())
    except ValueError as e:
        raise BundleError(f"{path}: not an ONNX graph ({e})") from None
    for location in sorted(locations):
        inside(folder, plain_name(location, f"{name}'s external data", folder))
    for file in (name, *sorted(locations)):
        if listed is not None and listed.get(file) != sha256_file(folder / file):
            raise BundleError(f"{folder / file}: sha256 does not match the one recorded in {CONFIG_FILE}; the file "
                              "was changed after export, export the folder again")
    return path


def _tokenizer(folder: Path, ours: Any) -> Tokenizer | None:
    """A folder of ours: our tokenizer, described in config.json; else Hugging Face's MarianTokenizer files, where
    the folder has them; else none (token ids only)."""
    described = ours.get("tokenizer") if isinstance(ours, dict) else None
    if isinstance(described, dict) and described.get("kind") in KINDS:
        for name in KINDS[described["kind"]].files[1:]:  # the files beside its description
            inside(folder, name)
        return KINDS[described["kind"]].from_dict(folder, described)
    has_config = (folder / "tokenizer_config.json").is_file()
    tokenizer_config = _json(folder, "tokenizer_config.json") if has_config else {}
    if tokenizer_config.get("tokenizer_class") != "MarianTokenizer" or not all(
            (folder / f).is_file() for f in MARIAN_FILES.values()):
        return None
    for name in MARIAN_FILES.values():
        inside(folder, name)
    if tokenizer_config.get("separate_vocabs"):
        raise BundleError(f"{folder / 'tokenizer_config.json'}: separate_vocabs=true (two vocabularies) is not "
                          "supported; pass token ids, from a folder without the tokenizer files")
    special = {k: tokenizer_config.get(f"{k}_token", default) for k, default in (
        ("eos", "</s>"), ("unk", "<unk>"), ("pad", "<pad>"))}
    special = {k: v.get("content") if isinstance(v, dict) else v for k, v in special.items()}  # AddedToken form
    return MarianTokenizer(folder, _json(folder, MARIAN_FILES["vocab"]), **special)


class OptimumFolder:
    """What a folder in Optimum's layout holds: its graphs' files, the model's special tokens and sizes, and its
    generation defaults."""

    def __init__(self, folder: Path, verify: bool = True) -> None:
        self.path = folder
        config = _json(folder, CONFIG_FILE)
        settings = _json(folder, GENERATION_FILE) if (folder / GENERATION_FILE).is_file() else config
        where = folder / (GENERATION_FILE if settings is not config else CONFIG_FILE)
        self.model_type = str(config.get("model_type", "?"))
        if config.get("is_encoder_decoder") is False:
            raise BundleError(f"{folder}: a {self.model_type} model is not an encoder-decoder; Runtime runs seq2seq "
                              "folders (optimum-cli export onnx --task text2text-generation-with-past)")
        self.eos_id = _token(settings, config, "eos_token_id", where)
        self.pad_id = _token(settings, config, "pad_token_id", where)
        # Hugging Face starts from bos_token_id where no decoder start is set
        start = "decoder_start_token_id" if settings.get("decoder_start_token_id", config.get(
            "decoder_start_token_id")) is not None else "bos_token_id"
        self.start_id = _token(settings, config, start, where)
        problems = unsupported(settings, self.eos_id)
        if problems:
            raise BundleError(f"{where}: the {self.model_type} model's generation settings ask for what this runtime "
                              f"does not do: {', '.join(problems)}")
        try:
            self.generation = from_hugging_face(settings, self.eos_id)
        except (InputError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: unusable generation settings ({e})") from None
        vocab = config.get("vocab_size")
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
            raise BundleError(f"{folder / CONFIG_FILE}: vocab_size must be a positive integer, not {vocab!r}")
        self.ours = ours = config.get(OURS)
        # a folder of ours names the source vocabulary apart: vocab_size is the target's, which Optimum sizes by
        ours_config = ours.get("config") if isinstance(ours, dict) else None
        ours_config = ours_config if isinstance(ours_config, dict) else {}
        theirs = ours_config.get("src_vocab_size")
        self.source_vocab = theirs if isinstance(theirs, int) and not isinstance(theirs, bool) and theirs > 0 else vocab
        positions = config.get("max_position_embeddings")
        self.max_positions = positions if isinstance(positions, int) and positions > 0 else None
        if ours_config.get("position") == "sinusoidal":  # ours, positions from the formula: no bound
            self.max_positions = None
        listed = ours.get("files") if isinstance(ours, dict) and verify else None
        if listed is not None and not isinstance(listed, dict):
            raise BundleError(f"{folder / CONFIG_FILE}: {OURS}.files must map file names to sha256")
        # The export's graphs; where a folder holds one other set only (ORTQuantizer's `*_quantized.onnx`), that.
        suffixes = _suffixes(folder)
        if "" not in suffixes and len(suffixes) != 1:
            names = ", ".join(_suffixed(ENCODER_FILE, x) for x in suffixes)
            raise BundleError(f"{folder}: several sets of graphs ({names}); move the set to run into a folder of its "
                              "own, with config.json")
        suffix = "" if "" in suffixes else suffixes[0]
        merged, first, steps = (_suffixed(n, suffix) for n in (MERGED_FILE, DECODER_FILE, WITH_PAST_FILE))
        self.encoder = _checked_graph(folder, _suffixed(ENCODER_FILE, suffix), listed)
        # As Optimum chooses: the merged decoder where there is one (one copy of its weights in memory).
        if (folder / merged).exists():
            self.first = self.steps = _checked_graph(folder, merged, listed)
        elif (folder / first).exists() and (folder / steps).exists():
            self.first = _checked_graph(folder, first, listed)
            self.steps = _checked_graph(folder, steps, listed)
        else:
            raise BundleError(f"{folder}: no decoder with a cache: {merged}, or {first} with {steps} (export with "
                              "--task text2text-generation-with-past)")
        self.tokenizer = _tokenizer(folder, ours)

    def summary(self) -> dict[str, Any]:
        """What `edgeformer info` shows of the folder."""
        ours = self.ours if isinstance(self.ours, dict) else {}
        return {"folder": str(self.path), "layout": "optimum", "model_type": self.model_type,
                "made by": f"edgeformer, variant {ours.get('variant')}" if ours else "another tool (Optimum)",
                "graphs": sorted({self.encoder.name, self.first.name, self.steps.name}),
                "bytes": sum(p.stat().st_size for p in self.path.iterdir() if p.is_file()),
                "tokens": {"decoder start": self.start_id, "eos": self.eos_id, "pad": self.pad_id},
                "source vocabulary": self.source_vocab, "max positions": self.max_positions,
                "tokenizer": type(self.tokenizer).__name__ if self.tokenizer else None,
                "generation defaults": self.generation.to_dict(), "check": ours.get("check")}


class OptimumSessions:
    """The folder's graphs opened, their contract checked: the names each step feeds and what it returns."""

    def __init__(self, folder: OptimumFolder, open_graph: Callable[[Path], ort.InferenceSession]) -> None:
        self.encoder = open_graph(folder.encoder)
        self.first = open_graph(folder.first)
        self.steps = self.first if folder.steps == folder.first else open_graph(folder.steps)
        inputs, outputs = graph_io(self.encoder)
        if set(inputs) != {"input_ids", "attention_mask"} or HIDDEN not in outputs:
            raise BundleError(f"{folder.encoder}: the encoder maps {inputs} -> {outputs}; this runtime runs an encoder "
                              f"of input_ids and attention_mask that returns {HIDDEN} (a text encoder)")
        self.merged = BRANCH in graph_io(self.first)[0]
        for session, path in ((self.first, folder.first), (self.steps, folder.steps)):
            inputs, outputs = graph_io(session)
            strange = [n for n in inputs if n not in STEP_INPUTS and not n.startswith("past_key_values.")]
            if strange or "logits" not in outputs:
                raise BundleError(f"{path}: the decoder takes {strange or inputs} and returns {outputs}; this runtime "
                                  f"feeds {', '.join(STEP_INPUTS)} and the cache, and reads logits")
        past = [i for i in self.steps.get_inputs() if i.name.startswith("past_key_values.")]
        presents = set(graph_io(self.first)[1])
        if not past or any(p.name.replace("past_key_values.", "present.", 1) not in presents for p in past):
            raise BundleError(f"{folder.steps}: its past inputs are not the first step's present outputs")
        self.past = [p.name for p in past]
        self.present = {n: n.replace("past_key_values.", "present.", 1) for n in self.past}
        self.inputs = {id(x): graph_io(x)[0] for x in (self.encoder, self.first, self.steps)}  # what each is fed
        # heads and head size from the declared cache shapes (batch, heads, length, head size)
        shape = past[0].shape
        if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            raise BundleError(f"{folder.steps}: {past[0].name} has shape {shape}, not (batch, heads, length, size)")
        self.heads, self.head_size = int(shape[1]), int(shape[3])
        self.cache_dtype = np.float16 if "float16" in past[0].type else np.float32
        logits = next(o for o in self.first.get_outputs() if o.name == "logits").shape
        if len(logits) != 3 or not isinstance(logits[2], int):
            raise BundleError(f"{folder.first}: logits of shape {logits}, not (batch, length, vocabulary)")
        self.vocab = int(logits[2])


class OptimumSteps(StepModel):
    """The decoder of one generate call over Optimum's graphs. Each step's present values stay onnxruntime's, bound
    as the next step's past. Their cross-attention cache is per row: a source's beams hold equal copies, which beams
    moving within their source leave as they are; the self-attention rows that beams move to are rewritten in
    place."""

    def __init__(self, sessions: OptimumSessions, path: Path, input_ids: np.ndarray, attention_mask: np.ndarray,
                 rows: int) -> None:
        self.sessions, self.path, self.vocab = sessions, path, sessions.vocab
        hidden = self._run(sessions.encoder, {"input_ids": input_ids, "attention_mask": attention_mask},
                           [HIDDEN])[HIDDEN].numpy()
        self.fixed = {"encoder_hidden_states": np.repeat(hidden, rows, 0),
                      "encoder_attention_mask": np.repeat(attention_mask, rows, 0)}
        self.group = rows  # rows per source, next to each other, while none has left
        self.past: dict[str, Any] = {}  # OrtValues (or numpy arrays once rows have left)
        self.own = [n for n in sessions.past if is_self_cache(n)]  # the self-attention cache

    def _run(self, session: ort.InferenceSession, feeds: dict[str, Any], outputs: list[str]) -> dict[str, Any]:
        binding = session.io_binding()
        for name in self.sessions.inputs[id(session)]:
            value = feeds[name]
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:
            binding.bind_output(name, "cpu")
        try:
            session.run_with_iobinding(binding)
        except ORT_ERRORS as e:
            raise EngineError(f"{self.path}: onnxruntime failed running a graph: {e}") from e
        return dict(zip(outputs, binding.get_outputs(), strict=True))

    def log_probs(self, tokens: np.ndarray) -> np.ndarray:
        s = self.sessions
        first = not self.past
        feeds: dict[str, Any] = {"input_ids": tokens.astype(np.int64)[:, None], **self.fixed}
        if first:
            empty = np.zeros((len(tokens), s.heads, 0, s.head_size), s.cache_dtype)
            feeds.update(dict.fromkeys(s.past, empty))  # read by a merged decoder's cache branch only
        else:
            feeds.update(self.past)
        feeds[BRANCH] = np.array([not first])
        # the self-attention cache each step, the cross-attention one from the first only
        wanted = s.past if first else self.own
        out = self._run(s.first if first else s.steps, feeds, ["logits", *(s.present[n] for n in wanted)])
        for name in wanted:
            self.past[name] = out[s.present[name]]
        return log_softmax(np.asarray(out["logits"].numpy()[:, -1], np.float32))

    def reorder(self, rows: np.ndarray) -> None:
        count = len(self.fixed["encoder_attention_mask"])
        if len(rows) == count and np.array_equal(rows // self.group, np.arange(count) // self.group):
            moved = np.flatnonzero(rows != np.arange(count))  # beams within their sources: only those rows
            if len(moved):
                for name in self.own:
                    cache = host(self.past[name])  # a view of its memory
                    cache[moved] = cache[rows[moved]]
            return
        self.group = 1  # rows left: every per-row value follows them
        self.fixed = {n: v[rows] for n, v in self.fixed.items()}
        self.past = {n: np.ascontiguousarray(host(v)[rows]) for n, v in self.past.items()}


class OptimumRuntime(Runtime):
    """Runtime over a folder in Optimum's layout: the same API (generate, stream, translate), the search in Python.
    `Runtime(folder)` returns one where the folder is in that layout. It has no manifest: `folder` says what the
    folder holds."""

    layout = "optimum"

    def __init__(self, bundle: Path | str, providers: Sequence[str] = ("cpu",), threads: int | None = None,
                 optimization: str = "all", verify: bool = True, spin: bool = True,
                 decoder_threads: int | None = None, limits: Limits | None = None, search: str = "auto") -> None:
        if search not in ("auto", "python"):
            raise InputError(f"search={search!r}: a folder in Optimum's layout searches in Python ('auto' or "
                             "'python')")
        self._take_arguments(bundle, providers, threads, optimization, decoder_threads, limits)
        self.folder = OptimumFolder(self.path, verify)
        self.search, self.search_session = "python", None
        self.optimization, self.threads, self.spin = optimization, threads, spin
        self.graphs = OptimumSessions(self.folder, lambda path: self._open_file(
            path, lambda: session_options(optimization, threads, spin)))
        self._placed(self.graphs.steps)
        self.max_positions = self.folder.max_positions
        self.config = {"src_vocab_size": self.folder.source_vocab, "tgt_vocab_size": self.graphs.vocab,
                       "pad_id": self.folder.pad_id, "bos_id": self.folder.start_id, "eos_id": self.folder.eos_id}
        self.generation: GenerationConfig = self.folder.generation
        self.tokenizer = self.folder.tokenizer

    @property
    def variant(self) -> str:
        return str(self.folder.summary()["made by"])

    @property
    def misses(self) -> list[str]:
        return []

    def graph_runs(self, gen: GenerationConfig, on_token: Any = None) -> str:
        return "a folder in Optimum's layout has no one-graph search"

    def step_model(self, input_ids: np.ndarray, attention_mask: np.ndarray, rows_per_input: int,  # type: ignore[override]
                   steps: int = 0) -> OptimumSteps:
        """The search's step model over Optimum's graphs (not a `_Steps`: calibration takes our bundles only)."""
        return OptimumSteps(self.graphs, self.path, input_ids, attention_mask, rows_per_input)
