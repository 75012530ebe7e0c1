"""Serving on Ray: requests checked before they are queued, batches that answer what each request gets alone, and
`edgeformer serve` under a bounded load on loopback, every answer checked (benchmarks/serve.py's client)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeformer.runtime.errors import EngineError
from edgeformer.runtime.options import GenerationConfig, Limits
from edgeformer.runtime.session import Runtime
from edgeformer.serve.requests import Job, RequestError, parse, run_batch
from tests.helpers import edgeformer, texts

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("aiohttp") is None,
                               reason="Ray Serve is not installed: pip install 'edgeformer[serve]'")


def test_serving_imports_neither_torch_nor_onnx() -> None:
    """A replica holds the runtime alone: what the device install has, plus Ray."""
    modules = "edgeformer.serve.requests, edgeformer.serve.corpus" + (
        ", edgeformer.serve.service" if importlib.util.find_spec("ray") else "")
    code = (f"import sys; import {modules}; "
            "bad = [m for m in ('torch', 'onnx', 'safetensors') if m in sys.modules]; assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_ray_actor_runs_on_the_threads_of_the_cpus_it_reserves_unless_told_otherwise() -> None:
    from edgeformer.serve.cluster import actor_threads

    assert [actor_threads(None, cpus) for cpus in (0.5, 1.0, 2.0, 3.9)] == [1, 1, 2, 3]
    assert actor_threads(4, 1.0) == 4


@pytest.fixture(scope="module")
def demo(exported) -> Path:
    return exported("demo")[1]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{", 400, "not JSON"),
    (b"[1]", 400, "JSON object"),
    (b'{"texts": ["1 May 2001"]}', 400, "unknown fields ['texts']"),
    (b'{"inputs": []}', 400, "non-empty list"),
    (b'{"inputs": [""]}', 400, "text 0 is empty"),
    (b'{"inputs": ["1 May 2001", [4, 5]]}', 400, "mixes texts and token-id lists"),
    (b'{"inputs": [[4, 99999]]}', 400, "outside the source vocabulary"),
    (b'{"inputs": ["1 May 2001"], "num_beams": 0, "strategy": "beam"}', 400, "num_beams must be >= 1"),
    (b'{"inputs": ["1 May 2001"], "max_new_tokens": 100000}', 413, "--limit-new-tokens"),
    (b'{"inputs": ["1 May 2001", "2 May 2001"], "stream": true}', 400, "give one input"),
    (b'{"inputs": ["1 May 2001"], "stream": 1}', 400, "\"stream\" must be true or false"),
    (b"[" * 100_000, 400, "not JSON we read"),  # deeper than Python's recursion
    (b'{"inputs": [[' + b"9" * 5000 + b"]]}", 400, "not JSON we read"),  # an int above Python's 4,300 digits
    (json.dumps({"inputs": ["1 May 2001"] * 300, "strategy": "beam", "num_beams": 4}).encode(), 413,
     "300 inputs x 4 beams or samples are 1200 rows"),
])
def test_a_bad_request_is_refused_before_it_is_queued_with_a_status_and_the_fix(demo: Path, body: bytes, status: int,
                                                                                 message: str) -> None:
    with pytest.raises(RequestError) as refused:
        parse(body, Runtime(demo))
    assert refused.value.status == status and message in refused.value.message


def test_a_request_takes_the_bundles_defaults_and_its_own_settings_over_them(demo: Path) -> None:
    rt = Runtime(demo)
    job = parse(json.dumps({"inputs": ["1 May 2001"], "strategy": "beam", "num_beams": 3}).encode(), rt)
    assert job.ids == rt.tokenize(["1 May 2001"])
    assert job.gen == GenerationConfig.from_dict({**rt.generation.to_dict(), "strategy": "beam", "num_beams": 3})


def test_requests_batched_together_get_what_each_gets_alone(demo: Path) -> None:
    rt = Runtime(demo)
    ids = rt.tokenize(texts(12, seed=3))
    settings = [GenerationConfig(), GenerationConfig(strategy="beam", num_beams=4, num_return_sequences=2),
                GenerationConfig(max_new_tokens=4), GenerationConfig(strategy="sample", seed=7, top_k=3)]
    jobs = [Job(ids[i: i + 1 + i % 3], settings[i % len(settings)]) for i in range(len(ids))]
    batched = run_batch(rt, jobs)
    alone = [rt.generate(job.ids, job.gen) for job in jobs]
    assert [[[h.tokens for h in hs] for hs in r] for r in batched] == [[[h.tokens for h in hs] for hs in r]
                                                                       for r in alone]  # type: ignore[union-attr]
    assert all(len(r) == len(job.ids) for r, job in zip(batched, jobs, strict=True))  # type: ignore[arg-type]


def test_requests_that_differ_only_in_what_their_strategy_ignores_share_a_batch() -> None:
    greedy = [Job([[4]], GenerationConfig(seed=s, temperature=t)) for s, t in ((None, 1.0), (3, 0.5))]
    beams = [Job([[4]], GenerationConfig(strategy="beam", top_p=p, suppress_tokens=st))
             for p, st in ((1.0, (3, 5)), (0.5, (5, 3)))]
    assert greedy[0].batch_key == greedy[1].batch_key and beams[0].batch_key == beams[1].batch_key
    assert Job([[4]], GenerationConfig(max_new_tokens=3)).batch_key != greedy[0].batch_key
    assert Job([[4]], GenerationConfig(strategy="sample", seed=1)).batch_key is None  # its draws: its own


def test_a_request_that_fails_in_a_batch_fails_alone(demo: Path) -> None:
    rt = Runtime(demo)
    generate = rt.generate
    poisoned = [99]

    def failing(src, gen=None, **kw):  # type: ignore[no-untyped-def]
        if any(list(s) == poisoned for s in src):
            raise MemoryError("out of memory")
        return generate(src, gen, **kw)

    rt.generate = failing  # type: ignore[method-assign]
    jobs = [Job([[5, 6, 7]], GenerationConfig()), Job([poisoned], GenerationConfig()),
            Job([[8, 9]], GenerationConfig())]
    results = run_batch(rt, jobs)
    assert isinstance(results[1], EngineError) and "MemoryError: out of memory" in str(results[1])
    assert [r[0][0].tokens for r in (results[0], results[2])] == [  # type: ignore[index]
        generate(job.ids)[0][0].tokens for job in (jobs[0], jobs[2])]


def test_a_batch_above_the_row_limit_runs_in_calls_within_it(demo: Path) -> None:
    rt = Runtime(demo, limits=Limits(rows=5))
    calls: list[int] = []
    generate = rt.generate

    def counted(src, gen=None, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(src))
        return generate(src, gen, **kw)

    rt.generate = counted  # type: ignore[method-assign]
    jobs = [Job(rt.tokenize(texts(2, seed=i)), GenerationConfig()) for i in range(6)]  # 12 rows
    results = run_batch(rt, jobs)
    assert calls == [4, 4, 4]
    assert [[h.tokens for h in hs] for r in results for hs in r] == [  # type: ignore[union-attr]
        [h.tokens for h in hs] for job in jobs for hs in generate(job.ids, job.gen)]


def test_serve_refuses_what_it_cannot_serve_in_one_line_before_ray_starts(demo: Path, tmp_path: Path) -> None:
    for args, message in ((["serve", str(tmp_path / "none")], "edgeformer serve: error:"),
                          (["serve", str(demo), "--batch-wait-ms", "-1"], "--batch-wait-ms -1.0: give a wait"),
                          (["serve", str(demo), "--threads", "0"], "threads=0")):
        result = edgeformer(*args)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


@needs_ray
@pytest.mark.slow
def test_behind_rays_haproxy_the_service_answers_as_behind_its_own_proxy(demo: Path) -> None:
    from edgeformer.benchmarks.serve import Service, mixed_cases, problems, send

    cases = mixed_cases(demo, 200, seed=4)
    with Service(demo, "--proxy", "haproxy") as service:
        outcomes = send(f"{service.url}/v1/generate", cases, clients=16, timeout=60)
        info = send(f"{service.url}/info", [cases[0]], clients=1)  # a POST where GET is the route: 405, not a 500
    assert problems(cases, outcomes) == []
    assert info[0].status == 405


@pytest.fixture(scope="module")
def service(demo: Path) -> Iterator[object]:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray Serve is not installed: pip install 'edgeformer[serve]'")
    from edgeformer.benchmarks.serve import Service

    with Service(demo, "--max-batch", "16") as running:  # Ray Serve's own proxy, the default
        yield running


@needs_ray
@pytest.mark.slow
def test_the_service_answers_mixed_requests_from_many_clients_each_with_what_the_runtime_gives(demo: Path,
                                                                                              service) -> None:
    from edgeformer.benchmarks.serve import mixed_cases, problems, send

    cases = mixed_cases(demo, 400, seed=1)
    start = time.monotonic()
    outcomes = send(f"{service.url}/v1/generate", cases, clients=24, timeout=60)
    assert time.monotonic() - start < 120
    assert problems(cases, outcomes) == []
    assert sum(c.status == 200 for c in cases) > 300 and {c.status for c in cases} == {200, 400, 413}


@needs_ray
@pytest.mark.slow
def test_the_service_streams_tokens_as_server_sent_events_and_says_what_it_serves(demo: Path, service) -> None:
    import urllib.request

    def get(path: str, body: dict | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(service.url + path, data=None if body is None else json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()

    assert get("/health") == (200, b'{"status":"ok"}')
    info = json.loads(get("/info")[1])
    assert info["variant"] == "fp32" and info["max_batch"] == 16 and info["tokenizer"] is True
    assert info["threads"] == 1  # the one CPU Ray reserves for a replica, not a thread per core of the machine
    status, body = get("/v1/generate", {"inputs": ["3 March 2021"], "stream": True})
    events = [block.split("\n") for block in body.decode().strip().split("\n\n")]
    kinds = [e[0].removeprefix("event: ") for e in events]
    data = [json.loads(e[1].removeprefix("data: ")) for e in events]
    rt = Runtime(demo)
    expected = rt.generate(rt.tokenize(["3 March 2021"]))[0][0].tokens
    assert status == 200 and kinds == ["token"] * len(expected) + ["end"]
    assert [d["token"] for d in data[:-1]] == expected == data[-1]["tokens"]
    assert "".join(d["text"] for d in data[:-1]) == data[-1]["text"] == rt.tokenizer.decode(expected)


@needs_ray
@pytest.mark.slow
def test_a_replica_that_dies_is_replaced_and_every_request_sent_meanwhile_is_answered_or_fails_loudly(
        demo: Path, service) -> None:
    from edgeformer.benchmarks.serve import good_cases, send

    cases = good_cases(demo, 1500, seed=2)  # some seconds of requests: the kill lands among them
    replica = subprocess.run(["pgrep", "-f", "ray::ServeReplica"], capture_output=True, text=True).stdout.split()
    assert replica, "no replica process found"
    killer = threading.Timer(1.0, lambda: subprocess.run(["kill", "-9", *replica], check=False))
    killer.start()
    outcomes = send(f"{service.url}/v1/generate", cases, clients=8, timeout=60)
    killer.join()
    assert all(o.status in (200, 0) or o.status >= 500 for o in outcomes)
    assert max(o.seconds for o in outcomes if o.status != 200) < 20  # a failure says so at once: none hangs
    assert any(o.status != 200 for o in outcomes), "the replica was not killed while requests were in flight"
    assert sum(o.status == 200 for o in outcomes) > 100  # it answered before the kill (and after, once replaced)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Ray starts a new replica
        again = send(f"{service.url}/v1/generate", cases[:4], clients=1, timeout=30)
        if all(o.status == 200 for o in again):
            break
        time.sleep(1)
    assert all(o.status == 200 for o in again)



@needs_ray
def test_serve_joins_a_cluster_started_apart_and_says_what_a_refusal_needs(demo: Path, monkeypatch) -> None:
    """`ray start --head` (Ray 2.59 and later turn its token authentication on), then the same command with
    RAY_ADDRESS: without the cluster's token it stops with the fix; with it, it serves; a second service at
    another port is refused with the address the cluster's Serve keeps."""
    import os
    import shutil
    import signal
    import socket
    import tempfile
    import urllib.request

    from edgeformer.benchmarks.serve import Service, free_port

    gcs, http = free_port(), free_port()
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "edgeformer-test-token-" + "7" * 42}
    # a temporary folder of its own (short: Ray's sockets are in it), so that the file where `ray start` leaves its
    # address for a later ray.init() is not the machine's; --block: its processes stop with this one's group
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                            env={**os.environ, **token, "RAY_TMPDIR": temp}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", gcs), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not start"
                time.sleep(0.5)
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{gcs}")
        for name in token:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("RAY_gcs_server_port_wait_time_s", "2")  # Ray's tries before it gives up (20 s)
        refused = edgeformer("serve", str(demo), "--port", str(http))
        assert refused.returncode == 1 and "RAY_AUTH_MODE=token" in refused.stderr, refused.stderr[-500:]
        monkeypatch.delenv("RAY_gcs_server_port_wait_time_s")
        for name, value in token.items():
            monkeypatch.setenv(name, value)
        with Service(demo, port=http) as running:
            body = json.dumps({"inputs": ["5 mars 1998"]}).encode()
            request = urllib.request.Request(f"{running.url}/v1/generate", body, {"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as r:
                assert json.loads(r.read())["outputs"][0][0]["text"] == "1998-03-05"
        other = edgeformer("serve", str(demo), "--port", str(free_port()))
        assert other.returncode == 1 and f"at 127.0.0.1:{http}" in other.stderr, other.stderr[-500:]
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # SIGTERM: Ray takes 30 s to stop it
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
