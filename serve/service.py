"""`edgeformer serve`: a bundle behind HTTP on Ray Serve. Each replica holds a Runtime; Ray Serve's dynamic batching
(`@serve.batch`) gathers the requests that arrive together into batched generate calls, so that throughput under
load follows the runtime's batched figures. The same code runs on a laptop and on a Ray cluster (RAY_ADDRESS).

Routes: POST /v1/generate (JSON, or server-sent events with "stream": true), GET /health, GET /info. Request
checks and batching are in serve/requests.py; Ray Serve exports its own request metrics (counts, latencies,
queue lengths) to Prometheus, and these replicas add tokens generated and batch sizes.
"""


import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram

from edgeformer.runtime.errors import EdgeformerError
from edgeformer.runtime.options import Hypothesis, Limits
from edgeformer.runtime.session import Runtime
from edgeformer.serve.cluster import actor_threads, init_ray, serving_at
from edgeformer.serve.requests import MAX_BODY, Job, RequestError, answer, parse, run_batch, text

MIN_ONGOING = 256  # requests a replica holds at once, at least: the rest wait at the proxy, which backs off
app = FastAPI(title="edgeformer", docs_url=None, redoc_url=None)

# Ray pickles the deployment class when it is declared: what its methods call is declared above it, and its
# annotations are real objects (FastAPI reads them to know a Request)


@dataclass(frozen=True)
class Settings:
    """How a replica runs: its runtime's options, and Ray Serve's batching (max_batch 1: batching off). threads:
    the replica's intra-op threads (serve_bundle gives those of the CPUs it reserves where None)."""

    bundle: str
    max_batch: int = 32
    batch_wait_ms: float = 2.0
    threads: int | None = None
    providers: tuple[str, ...] = ("cpu",)
    limits: Limits = field(default_factory=Limits)


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def read_body(request: Request) -> bytes:
    """The body, read no further than MAX_BODY (a declared or a streamed length above it is refused unread)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise RequestError(413, f"the request body has {int(declared)} bytes, above the service's {MAX_BODY}; send "
                                "fewer inputs per request")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY:
            raise RequestError(413, f"the request body is above the service's {MAX_BODY} bytes; send fewer inputs "
                                    "per request")
    return bytes(body)


def summary(rt: Runtime, settings: Settings) -> dict[str, Any]:
    """What /info answers: the bundle's manifest in short, and how this service runs it."""
    m = rt.manifest
    return {"bundle": os.path.basename(os.path.normpath(settings.bundle)), "family": m.family, "variant": m.variant,
            "config": m.config, "generation": rt.generation.to_dict(), "tokenizer": rt.tokenizer is not None,
            "provider": rt.provider, "search": m.search, "limits": vars(settings.limits),
            "threads": rt.threads, "max_batch": settings.max_batch, "batch_wait_ms": settings.batch_wait_ms}


@serve.deployment
@serve.ingress(app)
class Generator:
    def __init__(self, settings: Settings) -> None:
        self.rt = Runtime(settings.bundle, providers=settings.providers, threads=settings.threads,
                          limits=settings.limits)
        if not hasattr(self.rt, "generate"):
            raise EdgeformerError(f"{settings.bundle} is not a bundle that generates (an image classifier's?); "
                                  "serve serves encoder-decoder bundles")
        # generate runs on one thread of its own: the event loop goes on taking requests into the next batch
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="generate")
        batched: Any = self.batched  # @serve.batch's method, which mypy takes for a plain one
        batched.set_max_batch_size(settings.max_batch)
        batched.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)
        self.info = summary(self.rt, settings)
        self.tokens = Counter("edgeformer_tokens_generated", description="tokens generated (best hypotheses)")
        self.batch_sizes = Histogram("edgeformer_batch_requests", description="requests per batched generate call",
                                     boundaries=[1, 2, 4, 8, 16, 32, 64, 128])

    @app.get("/health")
    def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def describe(self) -> dict[str, Any]:
        return self.info

    @app.post("/v1/generate")
    async def generate(self, request: Request) -> Any:
        try:
            job = parse(await read_body(request), self.rt)
        except RequestError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        if job.stream:
            return StreamingResponse(self.events(job), media_type="text/event-stream")
        result = await self.batched(job)
        if isinstance(result, EdgeformerError):  # the inputs passed every check: the engine failed
            return JSONResponse({"error": str(result)}, status_code=500)
        # serialized here: FastAPI's encoder walks every value of a returned dict first, a cost on each request
        return Response(json.dumps(answer(self.rt, result)), media_type="application/json")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)  # set in __init__
    async def batched(self, jobs: list[Job]) -> list[list[list[Hypothesis]] | EdgeformerError]:
        results = await asyncio.get_running_loop().run_in_executor(self.worker, run_batch, self.rt, jobs)
        # recorded once a batch, not once a request: each record costs Ray's metrics some Python
        self.batch_sizes.observe(len(jobs))
        self.tokens.inc(sum(len(hs[0].tokens) for r in results if not isinstance(r, EdgeformerError) for hs in r))
        return results

    def events(self, job: Job) -> Iterator[str]:
        """Server-sent events: one `token` event a token (its id and the text it adds), then `end` with the whole
        sequence, or `error`. Starlette runs this in a thread; a client that leaves stops the search."""
        tokens: list[int] = []
        shown = ""  # the text of the tokens sent so far: each token's text is what it adds to it
        try:
            for token in self.rt.stream(job.ids[0], job.gen):
                tokens.append(token)
                full = text(self.rt, tokens)
                yield sse("token", {"token": token, "text": None if full is None else full[len(shown):]})
                shown = full or ""
        except EdgeformerError as e:
            yield sse("error", {"error": str(e)})
            return
        self.tokens.inc(len(tokens))
        yield sse("end", {"text": text(self.rt, tokens), "tokens": tokens})


PROXIES = ("ray", "haproxy")


def serve_bundle(settings: Settings, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
                 replica_cpus: float = 1.0, log_level: str = "WARNING", proxy: str = "ray",
                 metrics_port: int | None = None) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, deploy the bundle, and serve until SIGINT or SIGTERM.
    proxy: what takes the HTTP requests to the replicas: Ray Serve's own proxy (Python), or "haproxy", the HAProxy
    that Ray Serve ships and runs in its place (RAY_SERVE_ENABLE_HA_PROXY), several times the requests/s on a small
    machine (README: Serving); Ray's HAProxy also serves its stats on :8404 and metrics on :9101, every interface.
    metrics_port: where the cluster that this starts serves Prometheus metrics (None: a port Ray picks)."""
    import ray

    if proxy not in PROXIES:
        raise EdgeformerError(f"proxy {proxy!r}: choose one of {', '.join(PROXIES)}")
    # Read by Ray's processes, which inherit them where ray.init starts the cluster (on a cluster: README, Serving).
    # The replicas' code runs on their own event loop, not a second one in a thread of its own: one hop less a
    # request (1.4x the requests/s here); nothing of ours blocks it (generate runs on a worker thread).
    os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    if proxy == "haproxy":
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # a replica that stops keeps answering while HAProxy reloads without it (half a second here), not 30 s
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    settings = replace(settings, threads=actor_threads(settings.threads, replica_cpus))
    init_ray(logging_level=logging.getLevelName(log_level), include_dashboard=False, configure_logging=True,
             _metrics_export_port=metrics_port)
    # SIGTERM is how a supervisor stops a service: a clean stop, not the stack dump of the crash handler that
    # ray.init installs (so these come after it)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": log_level})
        serving_at(host, port)  # a cluster's Serve may have been started before, elsewhere
        deployment = cast(Any, Generator).options(  # a Deployment, once @serve.deployment has made it one
            num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus},
            # one batch runs while the next gathers (more wait at the proxy); as deep with batching off, so that a
            # replica never idles waiting for Ray's router to back off and retry
            max_ongoing_requests=max(2 * settings.max_batch, MIN_ONGOING))
        try:
            serve.run(deployment.bind(settings), name="edgeformer", route_prefix="/",
                      logging_config={"log_level": log_level})
        except RuntimeError as e:  # a replica that could not start: Ray's message names why (its log has more)
            raise EdgeformerError(f"the service did not start: {str(e).splitlines()[0]}") from None
        print(f"serving {settings.bundle} at http://{host}:{port}/v1/generate ({replicas} replica"
              f"{'s' if replicas > 1 else ''}, batches of up to {settings.max_batch}); Ctrl-C stops it", flush=True)
        while not stop.wait(0.5):
            pass
        # the replicas finish the requests they hold; serve.shutdown() would also wait out the proxy's draining
        # period (30 s), which guards nothing once they are gone
        serve.delete("edgeformer")
    finally:
        ray.shutdown()
