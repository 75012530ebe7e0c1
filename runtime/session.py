"""Load a bundle and generate with onnxruntime: numpy and onnxruntime only, never torch.

The caches are explicit values. The encoder's outputs (cross-attention keys and values) are computed once per
source and bound to every decoder step, read in place by all of the source's beams. The self-attention cache is
either buffers bound as each step's past and present both, written in place (a bundle optimized for the CPU), or
the `present.*` outputs of a step bound as the next step's `past_*` inputs as OrtValues, so that on CUDA they stay
on the device. Greedy and beam steps read the decoder's search head (the k best tokens of each row), not the whole
vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgeformer.runtime.base import OnProviders
from edgeformer.runtime.bundle import MANIFEST_FILE, MANIFEST_LIMIT, Manifest
from edgeformer.runtime.encoder_decoder import (
    DECODER,
    ENCODER,
    ENCODER_DECODER,
    END,
    LOGITS_MASK,
    PAST_LENGTH,
    SEARCH,
    SEARCH_FILE,
    TOP_IDS,
    TOP_K_INPUT,
    TOP_LOG_PROBS,
    is_self_cache,
    past_for,
)
from edgeformer.runtime.engine import (
    ORT_ERRORS,
    StepBinding,
    graph_io,
    session_options,
)
from edgeformer.runtime.errors import BundleError, EngineError, InputError, LimitError
from edgeformer.runtime.families import RUNTIMES
from edgeformer.runtime.options import GenerationConfig, Hypothesis, Limits, is_int
from edgeformer.runtime.providers import CPU
from edgeformer.runtime.search import StepModel, forced, greedy_or_sample, pad
from edgeformer.runtime.search import search as python_search
from edgeformer.runtime.tokenizer import load_tokenizer

SEARCH_MODES = ("auto", "graph", "python")  # where a bundle with a one-graph search searches (Runtime's `search`)
TO_HOST = ("logits", "sequences", "sequences_scores")  # outputs read on the host; caches stay on the device

# A decoder step that reads fewer weights than this, over all its rows, runs on one intra-op thread: handing its
# small operators to a second thread costs more than it saves (README: Benchmarks, "Threads").
SMALL_STEP_WEIGHTS = 2_000_000
# A buffered self-attention cache starts with room for the steps a call asks for, at most this many, and doubles
# when they run out: a call that asks for many new tokens and ends early does not hold memory for all of them.
INITIAL_CAPACITY = 128


def family_runtime(folder: Path) -> Any:
    """The runtime class of the bundle in `folder`, where its manifest names a family in RUNTIMES; else None (this
    Runtime, which reads the manifest in full and says what is wrong with it)."""
    try:
        with open(folder / MANIFEST_FILE, "rb") as f:
            family = json.loads(f.read(MANIFEST_LIMIT)).get("family")
    except (OSError, ValueError, AttributeError):
        return None
    return pkgutil.resolve_name(RUNTIMES[family]) if isinstance(family, str) and family in RUNTIMES else None


def step_weights(config: dict[str, Any]) -> int:
    """The weights one decoder step reads for one row: per layer the self-attention's four projections, the
    cross-attention's query and output ones (its keys and values come from the encoder, once), the feed-forward;
    then the output projection."""
    d, layers, d_ff = int(config["d_model"]), int(config["n_decoder_layers"]), int(config["d_ff"])
    return layers * (6 * d * d + 2 * d * d_ff) + d * int(config["tgt_vocab_size"])


class Runtime(OnProviders):
    """A loaded bundle (or a folder in Hugging Face Optimum's layout: `layout`, and runtime/optimum.py).
    Thread-safe: `generate` keeps all of its state in local variables.

    Errors: a bundle that cannot be used raises BundleError, inputs or settings that cannot be used InputError
    (LimitError above a limit), an onnxruntime failure on a checked graph EngineError; all are EdgeformerError."""

    layout = "edgeformer"  # what the folder is: our bundle, with a manifest; "optimum": Optimum's layout, without

    def __new__(cls, bundle: Path | str, *args: Any, **kwargs: Any) -> Runtime:
        """A folder in Hugging Face Optimum's seq2seq layout opens as an OptimumRuntime (runtime/optimum.py); a bundle
        of another family as that family's runtime (`RUNTIMES` in runtime/families.py: an image classifier's, say)."""
        if cls is Runtime and isinstance(bundle, (str, PathLike)):
            from edgeformer.runtime.optimum import OptimumRuntime, is_optimum_folder

            if is_optimum_folder(Path(bundle)):
                return super().__new__(OptimumRuntime)
            runtime = family_runtime(Path(bundle))
            if runtime is not None:
                return runtime(bundle, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, bundle: Path | str, providers: Sequence[str] = ("cpu",), threads: int | None = None,
                 optimization: str = "all", verify: bool = True, spin: bool = True,
                 decoder_threads: int | None = None, limits: Limits | None = None, search: str = "auto") -> None:
        """threads: intra-op threads (None: onnxruntime's default, one per physical core). decoder_threads: the
        decoder's, if they should differ; by default a generate call whose steps are small (SMALL_STEP_WEIGHTS)
        runs its decoder on one thread, and on `threads` otherwise. limits: what one call may ask (Limits).
        search: where a bundle that carries its search in one graph searches: "auto", in that graph when it can
        run the call's settings (`graph_runs`) and in Python over the two graphs otherwise; "graph" always (a call
        it cannot run is refused); "python" never."""
        # "all" even for graphs optimized offline: less leaves a tied projection's Transpose unfolded (README: Runtime)
        self._take_arguments(bundle, providers, threads, optimization, decoder_threads, limits)
        self.manifest = Manifest.load(self.path, verify=verify)
        if self.manifest.family != ENCODER_DECODER.name:
            raise BundleError(f"{self.path}: a {self.manifest.family} bundle; Runtime generates with "
                              f"{ENCODER_DECODER.name} bundles")
        self.config = self.manifest.config
        self.max_positions = self.manifest.max_positions
        self.decoder_threads = decoder_threads or threads

        # what the sessions open with: the two graphs may open after __init__ (a bundle with a one-graph search)
        self.optimization, self.threads, self.spin = optimization, threads, spin
        self.decoder_threads_asked = decoder_threads
        self.step_weights = step_weights(self.config)
        if search not in SEARCH_MODES:
            raise InputError(f"search={search!r}: choose one of {', '.join(SEARCH_MODES)}")
        if search == "graph" and self.manifest.search is None:
            raise InputError(f"{self.path} has no one-graph search; make a bundle with one with `--search greedy` "
                             "or `--search beam` on export, optimize or quantize")
        self.search = search
        self._sessions: dict[str, ort.InferenceSession] | None = None
        self.one_thread_decoder: ort.InferenceSession | None = None
        self.search_session = None
        if self.manifest.search is not None and search != "python":
            # the two graphs open when a call needs them (sampling, streaming): a deployment of the one graph holds
            # one session
            self.search_session = self._open(SEARCH, threads)
            self.manifest.graphs[SEARCH].check_names(*graph_io(self.search_session), self.path / SEARCH_FILE)
            self._placed(self.search_session)
        else:
            self._open_two_graphs()
        self.tokenizer = (load_tokenizer(self.path, self.manifest.files) if self.manifest.tokenizer else None)
        try:
            self.generation = GenerationConfig.from_dict(self.manifest.generation)
        except (InputError, TypeError) as e:
            raise BundleError(f"{self.path / MANIFEST_FILE}: bad generation defaults ({e})") from None
        self.encoder_outputs = self.manifest.graphs[ENCODER].output_names
        self.decoder_outputs = self.manifest.graphs[DECODER].output_names
        self.self_cache_inputs = [t for t in self.manifest.graphs[DECODER].inputs if is_self_cache(t.name)]
        self.cache_dtype = np.dtype(self.self_cache_inputs[0].dtype) if self.self_cache_inputs else np.float32

    def _open(self, graph: str, threads: int | None) -> ort.InferenceSession:
        # The encoder's attention takes memory in the square of the source, once a call: allocated without an
        # arena, it goes back when the run ends (README: Runtime, "Memory"). The decoder keeps its arena.
        return self._open_file(self.path / self.manifest.graph_files[graph],
                               lambda: session_options(self.optimization, threads, self.spin,
                                                       stop_spinning=graph != DECODER, arena=graph != ENCODER),
                               ENCODER_DECODER.cpu_unfused)

    def _open_two_graphs(self) -> dict[str, ort.InferenceSession]:
        self._sessions = {ENCODER: self._open(ENCODER, self.threads),
                          DECODER: self._open(DECODER, self.decoder_threads)}
        self._placed(self._sessions[DECODER])  # the one that actually runs
        if self.manifest.cache == "buffer" and self.device != "cpu":
            # its buffers are host memory read and written in place, which a device copies when they are bound
            raise BundleError(f"{self.path} passes its cache in CPU buffers, which {self.provider} cannot run; make "
                              "a bundle for it with `edgeformer optimize --provider <it> --cache concat`")
        # A second decoder session on one thread, for the small steps of a small model (see SMALL_STEP_WEIGHTS):
        # which one a call uses depends on its rows, and a session's threads are fixed when it opens. It costs
        # little: only a model whose step reads fewer than SMALL_STEP_WEIGHTS weights gets one.
        self.one_thread_decoder = (
            self._open(DECODER, 1) if self.decoder_threads_asked is None and self.threads != 1
            and self.provider == CPU and self.step_weights < SMALL_STEP_WEIGHTS else None)
        for name, session in self._sessions.items():
            self.manifest.graphs[name].check_names(*graph_io(session), self.path / self.manifest.graph_files[name])
        return self._sessions

    @property
    def sessions(self) -> dict[str, ort.InferenceSession]:
        """The encoder's and the decoder's sessions, opened when first needed where the bundle's search runs in one
        graph."""
        if self._sessions is None:
            with self._opening:  # generate serves many threads: the first calls of a one-graph bundle open these
                return self._sessions if self._sessions is not None else self._open_two_graphs()
        return self._sessions

    # -- checks ------------------------------------------------------------------------------------------------

    def check_inputs(self, src: Any, gen: Any) -> list[list[int]]:
        """The inputs as lists of ints, once they and the settings pass every check; InputError (LimitError)
        naming the first problem otherwise."""
        if not isinstance(gen, GenerationConfig):
            raise InputError(f"settings must be a GenerationConfig, not {type(gen).__name__}")
        if isinstance(src, (str, bytes)) or not _sequence(src):
            raise InputError(f"inputs must be a list of token-id sequences, not {type(src).__name__}"
                             + ("; use translate() for text" if isinstance(src, str) else ""))
        if len(src) == 0:
            raise InputError("no inputs: pass at least one sequence of token ids")
        ids = [_token_ids(seq, i) for i, seq in enumerate(src)]
        vocab = int(self.config["src_vocab_size"])
        for i, seq in enumerate(ids):
            bad = [t for t in seq if not 0 <= t < vocab]
            if bad:
                raise InputError(f"input {i} has token ids {bad[:5]} outside the source vocabulary [0, {vocab})")
        target_vocab = int(self.config["tgt_vocab_size"])
        if any(t >= target_vocab for t in gen.suppress_tokens):
            raise InputError(f"suppress_tokens {list(gen.suppress_tokens)} reach outside the target vocabulary "
                             f"[0, {target_vocab})")
        if len(set(gen.suppress_tokens)) >= target_vocab:
            raise InputError("suppress_tokens leave no token to generate")
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        bound = self.max_positions
        if bound is not None and len(ids[longest]) > bound:
            raise LimitError(f"input {longest} has {len(ids[longest])} tokens, more than this model's {bound} "
                             "learned positions; shorten it")
        if len(ids[longest]) > self.limits.source_tokens:
            raise LimitError(f"input {longest} has {len(ids[longest])} tokens, above this runtime's limit of "
                             f"{self.limits.source_tokens}; shorten it, or raise Limits.source_tokens "
                             "(--limit-source-tokens) if the machine can take it")
        if bound is not None and gen.max_new_tokens > bound:
            raise LimitError(f"max_new_tokens={gen.max_new_tokens} exceeds this model's {bound} learned positions; "
                             "lower it")
        if gen.max_new_tokens > self.limits.new_tokens:
            raise LimitError(f"max_new_tokens={gen.max_new_tokens} is above this runtime's limit of "
                             f"{self.limits.new_tokens}; lower it, or raise Limits.new_tokens (--limit-new-tokens)")
        rows = len(ids) * gen.rows_per_input
        if rows > self.limits.rows:
            raise LimitError(f"{len(ids)} inputs x {rows // len(ids)} beams or samples are {rows} rows, above this "
                             f"runtime's limit of {self.limits.rows}; split the inputs into smaller batches, or "
                             "raise Limits.rows (--limit-rows)")
        return ids

    # -- the two graphs ----------------------------------------------------------------------------------------

    def bind(self, binding: ort.IOBinding, inputs: dict[str, np.ndarray | ort.OrtValue]) -> None:
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))

    def bind_outputs(self, binding: ort.IOBinding, outputs: list[str]) -> None:
        """Logits and sequences come back to the host; caches stay where the provider computes them."""
        binding.clear_binding_outputs()
        for name in outputs:
            binding.bind_output(name, "cpu" if name in TO_HOST else self.device,
                                0 if name in TO_HOST else self.device_id)

    def _run(self, graph: str, inputs: dict[str, np.ndarray | ort.OrtValue], outputs: list[str]) -> list:
        session = self.search_session if graph == SEARCH else self.sessions[graph]
        assert session is not None
        binding = session.io_binding()
        self.bind(binding, inputs)
        self.bind_outputs(binding, outputs)
        try:
            session.run_with_iobinding(binding)
        except ORT_ERRORS as e:
            raise EngineError(f"{self.path}: onnxruntime failed running the {graph} graph: {e}") from e
        return binding.get_outputs()

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, ort.OrtValue]:
        """The decoder's cross-attention inputs, keyed by the decoder input name they feed."""
        values = self._run(ENCODER, {"input_ids": input_ids, "attention_mask": attention_mask},
                           self.encoder_outputs)
        return {past_for(name): v for name, v in zip(self.encoder_outputs, values, strict=True)}

    def empty_past(self, batch: int, positions: int = 0) -> dict[str, np.ndarray]:
        """The self-attention cache before the first step: no position (concatenated), or room for `positions`
        (buffers)."""
        return {t.name: np.zeros((batch, int(t.shape[1]), positions, int(t.shape[3])), self.cache_dtype)
                for t in self.self_cache_inputs}

    def generation_config(self, **overrides: Any) -> GenerationConfig:
        """The bundle's default settings (those its model was trained or imported with), with `overrides`."""
        try:
            return dataclasses.replace(self.generation, **overrides)
        except TypeError as e:  # an unknown setting
            raise InputError(f"{e}; the settings are those of GenerationConfig") from None

    def decoder(self, rows: int) -> tuple[ort.InferenceSession, int | None]:
        """The decoder session that runs a step over `rows` rows, and its intra-op threads (None: onnxruntime's
        default)."""
        if self.one_thread_decoder is not None and rows * self.step_weights < SMALL_STEP_WEIGHTS:
            return self.one_thread_decoder, 1
        return self.sessions[DECODER], self.decoder_threads

    def step_model(self, input_ids: np.ndarray, attention_mask: np.ndarray, rows_per_input: int,
                   steps: int = INITIAL_CAPACITY) -> _Steps:
        """The decoder over `rows_per_input` rows per input; `steps`: how many it is expected to run (a buffered
        cache is sized for them, up to INITIAL_CAPACITY, and grows if more run)."""
        return _Steps(self, input_ids, attention_mask, rows_per_input, steps)

    # -- generation --------------------------------------------------------------------------------------------

    def generate(self, src: Sequence[Sequence[int]], gen: GenerationConfig | None = None,
                 on_token: Callable[[int, int], None] | None = None, search: str | None = None,
                 operator_rules: bool = False) -> list[list[Hypothesis]]:
        """Token ids in, per input its hypotheses (best first) out. `on_token(input_index, token)` streams
        greedy and sampled tokens as they are produced. search: this call's, if not the runtime's (see __init__).
        operator_rules: the Python beam search scores a beam that reaches max_new_tokens as onnxruntime's
        BeamSearch does (its length counts the decoder start token), to compare the two like with like."""
        gen = self.generation if gen is None else gen
        ids, mask = pad(self.check_inputs(src, gen), int(self.config["pad_id"]))
        mode = self.search if search is None else search
        if mode not in SEARCH_MODES:
            raise InputError(f"search={mode!r}: choose one of {', '.join(SEARCH_MODES)}")
        why = "" if mode == "python" else self.graph_runs(gen, on_token)
        if mode == "graph" and why:
            raise InputError(f"the one-graph search cannot run this call: {why}; use search='python' (or 'auto')")
        if mode != "python" and not why:
            return self._search_in_graph(ids, mask, gen)
        return python_search(lambda rows: self.step_model(ids, mask, rows, gen.max_new_tokens), len(ids), gen,
                             int(self.config["bos_id"]), int(self.config["eos_id"]), int(self.config["pad_id"]),
                             on_token, operator_rules=operator_rules)

    def graph_runs(self, gen: GenerationConfig, on_token: Callable[[int, int], None] | None = None) -> str:
        """Why the bundle's one-graph search cannot run these settings ("" where it can)."""
        found = self.manifest.search
        if found is None or self.search_session is None:
            return "the runtime holds no one-graph search" + ("" if found else " (the bundle has none)")
        one_beam = gen.strategy == "greedy"
        if gen.strategy not in ("greedy", found["strategy"]):
            return f"strategy {gen.strategy!r} (the graph searches {found['strategy']})"
        if on_token is not None:
            return "tokens streamed as they are produced (the graph returns whole sequences)"
        if gen.ignore_eos or gen.forced_eos:
            return "ignore_eos or forced_eos (the graph ends a sequence at EOS and forces nothing)"
        if one_beam and not found["early_stopping"]:
            return ("greedy search (the graph was built without early stopping, which its one-beam greedy form needs: "
                    "make one with --search greedy)")
        if not one_beam and gen.early_stopping != found["early_stopping"]:
            return (f"early_stopping={gen.early_stopping} (the graph was built with "
                    f"early_stopping={found['early_stopping']})")
        return ""

    def _search_in_graph(self, ids: np.ndarray, mask: np.ndarray, gen: GenerationConfig) -> list[list[Hypothesis]]:
        vocab_mask = np.ones(int(self.config["tgt_vocab_size"]), np.int32)
        vocab_mask[list(gen.suppress_tokens)] = 0
        beam = gen.strategy == "beam"
        one = np.ones(1, np.int32)
        feeds = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
                 "max_length": one * (gen.max_new_tokens + 1), "min_length": one * (gen.min_new_tokens + 1),
                 "num_beams": one * (gen.num_beams if beam else 1),
                 "num_return_sequences": one * gen.num_return_sequences,
                 "length_penalty": np.array([gen.length_penalty if beam else 0.0], np.float32),  # greedy: the sum
                 "vocab_mask": vocab_mask}
        spec = self.manifest.graphs[SEARCH]
        sequences, scores = (v.numpy() for v in self._run(SEARCH, {n: feeds[n] for n in spec.input_names},
                                                          spec.output_names))
        # each sequence: the decoder start token, the new tokens, then END where it stopped (EOS is not kept)
        return [[Hypothesis([int(t) for t in seq[1:] if t != END], float(score))
                 for seq, score in zip(seqs, row_scores, strict=True)] for seqs, row_scores in zip(sequences, scores,
                                                                                                    strict=True)]

    def score(self, src: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
              gen: GenerationConfig | None = None) -> list[float]:
        """The log-probability of each target given its input, under gen's rules (suppressed tokens, EOS not before
        min_new_tokens), summed as the searches sum a hypothesis's before any length penalty. A target holds every
        token to score: append EOS to score a sequence that ends."""
        gen = self.generation if gen is None else gen
        if isinstance(targets, (str, bytes)) or not (_sequence(targets) and _sequence(src)) or len(targets) != len(
                src):
            raise InputError("score takes one target, a list of token ids, for each input")
        wanted = [_token_ids(t, i) for i, t in enumerate(targets)]
        vocab = int(self.config["tgt_vocab_size"])
        for i, target in enumerate(wanted):
            if not target or not all(0 <= t < vocab for t in target):
                raise InputError(f"target {i} must be a non-empty list of ids in the target vocabulary [0, {vocab})")
        # checked as the longest generation would be (a target may stop short of min_new_tokens: a prefix)
        longest = max(map(len, wanted))
        ids, mask = pad(self.check_inputs(src, dataclasses.replace(gen, max_new_tokens=max(longest,
                                                                                            gen.min_new_tokens))),
                        int(self.config["pad_id"]))
        return forced(self.step_model(ids, mask, 1, longest), wanted, gen, int(self.config["bos_id"]),
                      int(self.config["eos_id"]))

    def stream(self, src: Sequence[int], gen: GenerationConfig | None = None) -> Iterator[int]:
        """Yield the tokens of one input as they are produced (greedy, or one sample). The search runs in the
        caller's thread, a step each time a token is asked for: leave the loop (or close the iterator) and it stops.
        """
        gen = self.generation if gen is None else gen
        if isinstance(gen, GenerationConfig) and (gen.strategy == "beam" or gen.num_return_sequences != 1):
            raise InputError("streaming yields one sequence as it grows; use strategy='greedy' or 'sample' with "
                             "num_return_sequences=1")
        ids, mask = pad(self.check_inputs([src], gen), int(self.config["pad_id"]))
        produced = greedy_or_sample(self.step_model(ids, mask, 1, gen.max_new_tokens), 1, gen,
                                    int(self.config["bos_id"]), int(self.config["eos_id"]))
        return (token for _row, token in produced)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts as the token ids of the bundle's tokenizer. Empty (or blank) text is refused: the tokenizer
        would make it the end token alone, and the model would answer it with something."""
        if self.tokenizer is None:
            raise InputError(f"{self.path} carries no tokenizer; pass token ids to generate() instead")
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InputError(f"texts must be a list of strings, not {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"text {i} is a {type(text).__name__}, not a string")
            if not text.strip():
                raise InputError(f"text {i} is empty: there is nothing to translate")
        return self.tokenizer.encode_batch(texts)

    def translate(self, texts: Sequence[str], gen: GenerationConfig | None = None) -> list[str]:
        """Text in, text out (the best hypothesis of each), for bundles that carry a tokenizer."""
        hyps = self.generate(self.tokenize(texts), gen)
        assert self.tokenizer is not None  # tokenize() refused otherwise
        return [self.tokenizer.decode(h[0].tokens) for h in hyps]


def _sequence(value: Any) -> bool:
    """A list, tuple or array with a length (a 0-d array has none)."""
    return isinstance(value, Sequence) or (isinstance(value, np.ndarray) and value.ndim > 0)


def _token_ids(seq: Any, i: int) -> list[int]:
    """One input as a list of ints: refused unless it is a flat sequence of whole numbers."""
    if isinstance(seq, (str, bytes)) or not _sequence(seq):
        raise InputError(f"input {i} must be a sequence of token ids, not {type(seq).__name__}")
    if len(seq) == 0:
        raise InputError(f"input {i} is empty: every input needs at least one token")
    if isinstance(seq, np.ndarray):
        if seq.ndim != 1 or seq.dtype.kind not in "iu":
            raise InputError(f"input {i} must be a 1-D array of integer token ids, not {seq.ndim}-D {seq.dtype}")
        return [int(t) for t in seq]
    bad = [t for t in seq if not is_int(t)]
    if bad:
        raise InputError(f"input {i} has {bad[0]!r}, not an integer token id"
                         + ("; floats are not truncated" if isinstance(bad[0], float) else ""))
    return [int(t) for t in seq]


# The step's inputs written in place. On a device onnxruntime copies a host input when it is bound, not when the
# step runs, so they are bound again each step there; the CPU reads them where they are.
WRITTEN_IN_PLACE = ("input_ids", TOP_K_INPUT)


class _Steps(StepModel):
    """The decoder of one generate call. One IO binding lives as long as the call: the mask, the cross cache and
    the search head's k are bound once; each step rebinds only the new tokens (written into a bound array), the
    head's mask when the rules change it, and the self-attention cache: the buffers as its present (bound as past
    already), or as the next step's past, the present values the step returned."""

    def __init__(self, runtime: Runtime, input_ids: np.ndarray, attention_mask: np.ndarray, rows: int,
                 steps: int = INITIAL_CAPACITY) -> None:
        self.path, self.vocab = runtime.path, int(runtime.config["tgt_vocab_size"])
        on_host = runtime.device == "cpu"
        # The encoder runs once per source; its keys and values stay where it computed them, read by the source's
        # `group` rows (beams or samples) in place: nothing is copied per row.
        self.group = rows
        cross = runtime.encode(input_ids, attention_mask)
        self.fixed: dict[str, Any] = {"encoder_attention_mask": np.ascontiguousarray(attention_mask),
                                      **{n: StepBinding.raw(v) for n, v in cross.items()}}
        batch = len(attention_mask) * rows
        self.session, _ = runtime.decoder(batch)
        self.binding = StepBinding(self.session)
        # the binding does not keep numpy arrays alive: these references do, as long as they are bound
        self.held: dict[str, Any] = {}
        self.k = np.ones(1, np.int64)  # the search head's k, written in place
        free = np.zeros(self.vocab, np.float32)  # the head's mask until the rules bind theirs
        for name, value in {**self.fixed, TOP_K_INPUT: self.k, LOGITS_MASK: free}.items():
            self._bind(name, value)
        # A buffered cache: one array per tensor, bound as the step's past and present, `filled` positions of it
        # written. A concatenated one: the present values each step returns, bound as the next step's past.
        self.buffered = runtime.manifest.cache == "buffer"
        self.filled = np.zeros(1, np.int64)  # the buffers' past_length, written in place
        self.buffer_values: dict[str, Any] = {}  # each buffer's OrtValue, bound as past and present
        if self.buffered:
            self._bind(PAST_LENGTH, self.filled)
        self._set_past(runtime.empty_past(batch, max(1, min(steps, INITIAL_CAPACITY)) if self.buffered else 0))
        self.presents = [n for n in runtime.decoder_outputs if n.startswith("present.")]
        self.present_to_past = [past_for(n) for n in self.presents]
        self.cache_device = StepBinding.device(runtime.device, runtime.device_id)
        self.on_host = self.leaves = on_host  # on a device, rows leaving would go through the host
        self.host = StepBinding.device("cpu")
        # The tokens of each step are written into this bound array: on the CPU onnxruntime reads it in place.
        self.tokens = np.zeros((batch, 1), np.int64)
        self._bind("input_ids", self.tokens)
        # Which step and row computed each row's cache positions (one id each). Two rows whose position j came
        # from one computation hold the same bits up to j (beams of a source share a prefix, copied from one
        # parent), so a beam moving onto a row copies only the positions after what the two rows share.
        self.lineage = np.zeros((batch, 0), np.int64)
        self.computed = 0

    def _bind(self, name: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            self.held[name] = value
            self.binding.bind_input(name, value)
        else:
            self.binding.bind_value(name, value)

    def _set_past(self, past: dict[str, Any]) -> None:
        """Bind `past` (numpy arrays or OrtValues) as the next step's past; buffers as its present too."""
        self.past = past
        self.buffer_values = {}
        self.capacity = next(iter(past.values())).shape[2]  # a buffer's positions
        for name, value in past.items():
            if self.buffered:  # an OrtValue over the array's memory: onnxruntime reads and writes it in place
                self.held[name] = value
                self.buffer_values[name] = raw = StepBinding.raw(ort.OrtValue.ortvalue_from_numpy(value))
                self.binding.bind_value(name, raw)
            else:
                self._bind(name, value)

    def _grow(self) -> None:
        """Twice the buffers' positions, those filled copied."""
        filled = int(self.filled[0])
        grown: dict[str, np.ndarray] = {}
        for name, value in self.past.items():
            grown[name] = np.zeros((*value.shape[:2], 2 * value.shape[2], value.shape[3]), value.dtype)
            grown[name][:, :, :filled] = value[:, :, :filled]
        self._set_past(grown)

    def _step(self, tokens: np.ndarray, wanted: tuple[str, ...]) -> Any:
        """Run one step, returning the outputs `wanted` (to the host) and keeping the cache for the next."""
        self.tokens[:, 0] = tokens
        binding = self.binding
        if not self.on_host:
            for name in WRITTEN_IN_PLACE:
                binding.bind_input(name, self.held[name])
        binding.clear_outputs()  # bound anew each step: outputs bound once would be reused, and must keep a shape
        for name in wanted:
            binding.bind_output(name, self.host)
        if self.buffered:
            if self.filled[0] == self.capacity:
                self._grow()
            for present, past in zip(self.presents, self.present_to_past, strict=True):
                binding.bind_value_output(present, self.buffer_values[past])
        else:
            for name in self.presents:
                binding.bind_output(name, self.cache_device)
        try:
            binding.run()
        except ORT_ERRORS as e:  # only onnxruntime's: a caller's on_token is not in this try
            raise EngineError(f"{self.path}: onnxruntime failed running the decoder graph: {e}") from e
        outputs = binding.outputs()
        rows = len(self.tokens)
        self.lineage = np.concatenate([self.lineage, np.arange(self.computed, self.computed + rows)[:, None]], 1)
        self.computed += rows
        if self.buffered:
            self.filled[0] += 1
            return outputs
        self.past = {}
        for i, name in enumerate(self.present_to_past, start=len(wanted)):
            self.past[name] = value = outputs[i]
            binding.bind_value(name, value)
        return outputs

    def log_probs(self, tokens: np.ndarray) -> np.ndarray:
        logits = self._step(tokens, ("logits",))[0].numpy()[:, -1]  # (rows, V)
        return log_softmax(np.asarray(logits, dtype=np.float32))

    def top(self, tokens: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph's search head: k values a row come back instead of the vocabulary."""
        self.k[0] = k
        if mask is not self.held[LOGITS_MASK]:
            self._bind(LOGITS_MASK, mask)
        outputs = self._step(tokens, (TOP_LOG_PROBS, TOP_IDS))
        return outputs[0].numpy(), outputs[1].numpy()

    def reorder(self, rows: np.ndarray) -> None:
        """Keep the cache rows `rows`. Beams that move within their sources (beam search), on the host, rewrite in
        place the rows that change in the caches the last step returned (already bound as the next step's past).
        Fewer rows (those that ended leave) take new arrays: the caches, and the sources' mask and keys and values
        for the sources whose rows remain."""
        sources = rows // self.group
        if len(rows) == len(self.tokens) and np.array_equal(sources, np.arange(len(rows)) // self.group):
            moved = np.flatnonzero(rows != np.arange(len(rows)))
            if not len(moved):
                return
            if self.on_host:
                self._move(moved, rows[moved])
                return
        else:
            self._regroup(sources)
        self.lineage = self.lineage[rows]
        self._set_past({n: np.ascontiguousarray(host(v)[rows]) for n, v in self.past.items()})

    def _move(self, moved: np.ndarray, sources: np.ndarray) -> None:
        """Rewrite rows `moved` of the host caches, in place, with rows `sources`."""
        caches = [host(value) for value in self.past.values()]  # views of the OrtValues' memory
        end = self.lineage.shape[1]  # the positions written
        if np.intersect1d(moved, sources).size:  # a row both read and overwritten: copy the right side first
            for cache in caches:
                cache[moved, :, :end] = cache[sources, :, :end]
        else:  # row by row: one pass over the memory, where fancy indexing makes two
            for to, source in zip(moved.tolist(), sources.tolist(), strict=True):
                apart = np.flatnonzero(self.lineage[to] != self.lineage[source])
                start = int(apart[0]) if len(apart) else end  # the positions before it are the same bits
                for cache in caches:
                    cache[to, :, start:end] = cache[source, :, start:end]
        self.lineage[moved] = self.lineage[sources]

    def _regroup(self, sources: np.ndarray) -> None:
        """The rows left read `sources` (each row's source): the per-source values keep the sources that remain,
        once each where every one keeps the same number of rows next to each other, else once per row."""
        counts = np.bincount(sources)
        counts = counts[counts > 0]
        grouped = bool(np.all(np.diff(sources) >= 0)) and bool(np.all(counts == counts[0]))
        self.group = int(counts[0]) if grouped else 1
        index = sources[:: self.group]
        self.fixed = {n: np.ascontiguousarray(host(v)[index]) for n, v in self.fixed.items()}
        self.tokens = np.zeros((len(sources), 1), np.int64)
        for name, value in {**self.fixed, "input_ids": self.tokens}.items():
            self._bind(name, value)

    def inputs(self) -> dict[str, np.ndarray]:
        """The inputs of the next step but the tokens, on the host (for calibration)."""
        return {**{n: host(v) for n, v in {**self.fixed, **self.past}.items()}, TOP_K_INPUT: self.k.copy(),
                LOGITS_MASK: self.held[LOGITS_MASK], **({PAST_LENGTH: self.filled.copy()} if self.buffered else {})}


def host(value: Any) -> np.ndarray:
    """A value bound to a step, on the host: a numpy array, an OrtValue, or the raw one under it."""
    return value if isinstance(value, np.ndarray) else value.numpy()


def log_softmax(x: np.ndarray) -> np.ndarray:
    y = x - x.max(axis=-1, keepdims=True)
    y -= np.log(np.exp(y).sum(axis=-1, keepdims=True))  # in place: a pass over the vocabulary fewer
    return y
