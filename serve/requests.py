"""What a request to the service asks, checked in full before it is queued, and what it is answered; no Ray here.

A request is JSON: `{"inputs": [text or token-id list, ...], "stream": false, ...settings}`, the settings those of
GenerationConfig over the bundle's defaults. A bad one is refused with the runtime's own message and a 4xx status,
so that a batch only ever holds requests that can run. Requests whose settings are equal run as one batch; a
seeded sample runs alone, since its draws depend on the rows beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from edgeformer.runtime.errors import EdgeformerError, EngineError, InputError, LimitError
from edgeformer.runtime.options import GenerationConfig, Hypothesis
from edgeformer.runtime.session import Runtime

MAX_BODY = 8 << 20  # bytes: above what the default limits let through (1024 rows of 1024 ids), a bound on reading
SETTINGS = tuple(f.name for f in fields(GenerationConfig))
FIELDS = ("inputs", "stream", *SETTINGS)
DEFAULTS = GenerationConfig()
BEAM_ONLY = ("num_beams", "length_penalty", "early_stopping")
SAMPLE_ONLY = ("temperature", "top_k", "top_p", "seed")
IGNORED = {"greedy": BEAM_ONLY + SAMPLE_ONLY, "beam": SAMPLE_ONLY, "sample": BEAM_ONLY}


class RequestError(Exception):
    """A request refused: an HTTP status (4xx) and one line that names the problem and the fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Job:
    """A request that passed every check: the inputs as token ids and the settings to run them with."""

    ids: list[list[int]]
    gen: GenerationConfig
    stream: bool = False

    @property
    def batch_key(self) -> GenerationConfig | None:
        """What jobs must share to run in one generate call (None: this one runs alone): their settings, those
        that their strategy ignores set aside (a greedy request's seed or temperature, a beam's top_p)."""
        if self.gen.strategy == "sample" and self.gen.seed is not None:
            return None
        ignored = IGNORED[self.gen.strategy]
        return replace(self.gen, suppress_tokens=tuple(sorted(set(self.gen.suppress_tokens))),
                       **{k: getattr(DEFAULTS, k) for k in ignored})


def parse(body: bytes, rt: Runtime) -> Job:
    """A request body as a Job, or RequestError: 413 above a size limit, 400 for anything else wrong."""
    if len(body) > MAX_BODY:
        raise RequestError(413, f"the request body has {len(body)} bytes, above the service's {MAX_BODY}; send "
                                "fewer inputs per request")
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as e:  # not UTF-8 or not JSON, an integer of 4,300 digits, nesting too deep
        raise RequestError(400, f"the request body is not JSON we read ({str(e)[:120]}); send "
                                "{\"inputs\": [...]}") from None
    if not isinstance(request, dict):
        raise RequestError(400, f"the request must be a JSON object with \"inputs\", not a {type(request).__name__}")
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown fields {unknown}; the known ones are {list(FIELDS)}")
    if "inputs" not in request:
        raise RequestError(400, "no \"inputs\": give a list of texts or of token-id lists")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"\"stream\" must be true or false, not {stream!r}")
    settings = {k: v for k, v in request.items() if k in SETTINGS}
    try:
        gen = GenerationConfig.from_dict({**rt.generation.to_dict(), **settings})
        ids = rt.check_inputs(_token_ids(request["inputs"], rt, gen), gen)
    except LimitError as e:
        raise RequestError(413, str(e)) from None
    except (InputError, TypeError) as e:
        raise RequestError(400, str(e)) from None
    except (ValueError, RuntimeError, UnicodeError) as e:  # what a tokenizer raises on text it cannot take
        raise RequestError(400, f"the tokenizer cannot take these texts ({str(e)[:120]})") from None
    if stream and (len(ids) != 1 or gen.strategy == "beam" or gen.num_return_sequences != 1):
        raise RequestError(400, "streaming sends the tokens of one sequence as they come: give one input, with "
                                "strategy greedy or sample and num_return_sequences 1")
    return Job(ids, gen, stream)


def _token_ids(inputs: Any, rt: Runtime, gen: GenerationConfig) -> Any:
    """Texts through the bundle's tokenizer; token-id lists as they are (the runtime checks them). The rows are
    counted first: a request of a million short texts is refused before any is tokenized."""
    if not isinstance(inputs, list) or not inputs:
        raise InputError(f"\"inputs\" must be a non-empty list of texts or of token-id lists, not {inputs!r:.60}")
    rows = len(inputs) * gen.rows_per_input
    if rows > rt.limits.rows:
        raise LimitError(f"{len(inputs)} inputs x {gen.rows_per_input} beams or samples are {rows} rows, above the "
                         f"service's limit of {rt.limits.rows}; send fewer inputs per request")
    texts = [isinstance(x, str) for x in inputs]
    if all(texts):
        return rt.tokenize(inputs)
    if any(texts):
        raise InputError("\"inputs\" mixes texts and token-id lists; send one kind per request")
    return inputs


def run_batch(rt: Runtime, jobs: Sequence[Job]) -> list[list[list[Hypothesis]] | EdgeformerError]:
    """Each job's hypotheses (or the error its run raised), the jobs that share their settings run together in as
    few generate calls as the runtime's row limit allows."""
    results: list[list[list[Hypothesis]] | EdgeformerError] = [[] for _ in jobs]
    groups: dict[Any, list[int]] = {}
    for i, job in enumerate(jobs):
        key = job.batch_key
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    for members in groups.values():
        gen = jobs[members[0]].gen
        chunks = _chunks(members, [len(jobs[i].ids) * gen.rows_per_input for i in members], rt.limits.rows)
        while chunks:
            chunk = chunks.pop(0)
            try:
                hyps = rt.generate([ids for i in chunk for ids in jobs[i].ids], gen)
            except Exception as e:  # one request's failure must not answer for the others
                if len(chunk) > 1:  # run them one by one: only the failing one fails
                    chunks[:0] = [[i] for i in chunk]
                else:
                    results[chunk[0]] = e if isinstance(e, EdgeformerError) else EngineError(
                        f"generation failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            for i in chunk:
                results[i], hyps = hyps[:len(jobs[i].ids)], hyps[len(jobs[i].ids):]
    return results


def _chunks(members: list[int], rows: list[int], most: int) -> list[list[int]]:
    """Consecutive runs of members whose rows add up to at most `most` (a member over it alone: parse refused it)."""
    chunks: list[list[int]] = [[]]
    total = 0
    for member, n in zip(members, rows, strict=True):
        if chunks[-1] and total + n > most:
            chunks.append([])
            total = 0
        chunks[-1].append(member)
        total += n
    return chunks


def answer(rt: Runtime, hyps: list[list[Hypothesis]]) -> dict[str, Any]:
    """The response body: per input its hypotheses, best first, as text (where the bundle has a tokenizer), token
    ids and score."""
    return {"outputs": [[{"text": text(rt, h.tokens), "tokens": h.tokens, "score": h.score} for h in hs]
                        for hs in hyps]}


def text(rt: Runtime, tokens: list[int]) -> str | None:
    return rt.tokenizer.decode(tokens) if rt.tokenizer is not None else None
