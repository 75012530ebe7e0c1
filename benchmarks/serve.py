"""The HTTP service under load (`edgeformer serve`, Ray Serve): requests/s and p50/p99 latency at 1, 8, 32 and 128
concurrent clients, with dynamic batching on (--max-batch 32) and off (--max-batch 1). The service runs in a process
of its own (and Ray's), the clients in this one. Every answer is checked: a good request must get what the runtime
answers it alone, token for token, and a bad one a 4xx with a message; anything else is counted lost or mangled.

    .venv/bin/python benchmarks/serve.py grid BUNDLE --out benchmarks/results/serve-avx512-vnni   # 3 rounds
    .venv/bin/python benchmarks/serve.py mixed BUNDLE --requests 10000 --clients 32

Each is measured with Ray Serve's own proxy and with the HAProxy it ships (`--proxy`), and `--threads` sets the
replicas' intra-op threads (`grid --threads default,2` measures both in the same rounds). `grid` sends one text a
request, greedy (the common case), and first prints what the model costs a request alone and in a batch; `mixed`
sends texts and token ids, one to three inputs, greedy, beam and seeded sampling, and one request in ten a bad one
(empty, too long, bad settings, not JSON...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeformer.model.tasks import get_task
from edgeformer.runtime.options import GenerationConfig
from edgeformer.runtime.session import Runtime

CLIENTS = (1, 8, 32, 128)


@dataclass(frozen=True)
class Case:
    """A request and what it must be answered: its status and, for a good one, each input's best tokens."""

    body: bytes
    status: int
    tokens: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Outcome:
    case: int
    status: int  # 0: no answer (the connection failed or timed out)
    body: bytes
    seconds: float


def good_cases(bundle: Path, n: int, seed: int = 0, mixed: bool = False) -> list[Case]:
    """Requests of the built-in dates task (the shipped model's), with their expected answers from the runtime
    itself, one request at a time. mixed: also token ids, several inputs, beam search and seeded sampling."""
    rt = Runtime(bundle)
    task, rng = get_task("dates"), random.Random(seed)
    found = []
    for _ in range(n):
        texts = [task.sample(rng, "test")[0] for _ in range(rng.choice((1, 1, 2, 3)) if mixed else 1)]
        settings: dict[str, Any] = {}
        if mixed:
            settings = rng.choice(({}, {}, {}, {"strategy": "beam", "num_beams": 4},
                                   {"strategy": "sample", "seed": rng.randrange(1000), "top_k": 5},
                                   {"max_new_tokens": rng.randrange(1, 12)}))
        ids = rt.tokenize(texts)
        inputs: list[Any] = ids if mixed and rng.random() < 0.3 else texts
        gen = GenerationConfig.from_dict({**rt.generation.to_dict(), **settings})
        best = tuple(tuple(hs[0].tokens) for hs in rt.generate(ids, gen))
        found.append(Case(json.dumps({"inputs": inputs, **settings}).encode(), 200, best))
    return found


def bad_cases(vocab: int) -> list[Case]:
    """Requests the service must refuse with a 4xx and a message, never a 500 or a dead replica."""
    bodies: list[tuple[Any, int]] = [
        ({"inputs": [""]}, 400), ({"inputs": []}, 400), ({"inputs": "12 May 2020"}, 400), ({}, 400),
        ({"inputs": ["12 May 2020"], "beams": 4}, 400), ({"inputs": ["12 May 2020"], "num_beams": 0}, 400),
        ({"inputs": ["12 May 2020"], "temperature": -1, "strategy": "sample"}, 400),
        ({"inputs": [[1, vocab + 5]]}, 400), ({"inputs": [[1.5, 2]]}, 400), ({"inputs": [["a"], [3]]}, 400),
        ({"inputs": ["12 May 2020", [3, 4]]}, 400), ({"inputs": ["12 May 2020"], "max_new_tokens": 10**6}, 413),
        ({"inputs": ["x" * 5000]}, 413), ({"inputs": ["12 May 2020"], "stream": "yes"}, 400),
        ({"inputs": ["12 May 2020", "1 June 2001"], "stream": True}, 400), ([1, 2, 3], 400)]
    cases = [Case(json.dumps(body).encode(), status) for body, status in bodies]
    odd = [b"{not json", b"\xff\xfe", b"", b"[" * 100_000, b'{"inputs": [[' + b"9" * 5000 + b']]}']
    return [*cases, *(Case(body, 400) for body in odd)]


def model_cost(bundle: Path, max_batch: int, repeats: int = 5, seed: int = 0) -> dict[str, list[float]]:
    """What the model costs a request, in ms, on the one thread of a default replica: alone, and in a batch of
    max_batch (the most batching can gain is their ratio), `repeats` times each, before any service runs."""
    rt, task, rng = Runtime(bundle, threads=1), get_task("dates"), random.Random(seed)
    ids = rt.tokenize([task.sample(rng, "test")[0] for _ in range(10 * max_batch)])
    cost: dict[str, list[float]] = {"alone": [], "batched": []}
    for _ in range(repeats):
        for key, batch, n in (("alone", 1, 100), ("batched", max_batch, len(ids))):
            start = time.perf_counter()
            for k in range(0, n, batch):
                rt.generate(ids[k: k + batch])
            cost[key].append((time.perf_counter() - start) * 1000 / n)
    return cost


def mixed_cases(bundle: Path, n: int, seed: int = 0, bad_share: float = 0.1) -> list[Case]:
    rng = random.Random(seed)
    bad = bad_cases(int(Runtime(bundle).config["src_vocab_size"]))
    n_bad = round(n * bad_share)
    cases = good_cases(bundle, n - n_bad, seed, mixed=True) + [rng.choice(bad) for _ in range(n_bad)]
    rng.shuffle(cases)
    return cases


async def _send(url: str, cases: Sequence[Case], clients: int, timeout: float) -> list[Outcome]:
    import aiohttp  # Ray Serve's own dependency; a third of httpx's CPU a request, which matters on 2 cores

    outcomes: list[Outcome] = []
    queue = iter(range(len(cases)))
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients),
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async def one_client() -> None:
            for i in queue:
                start = time.perf_counter()
                try:
                    async with session.post(url, data=cases[i].body, headers=headers) as r:
                        status, body = r.status, await r.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    status, body = 0, repr(e).encode()
                outcomes.append(Outcome(i, status, body, time.perf_counter() - start))

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return outcomes


def send(url: str, cases: Sequence[Case], clients: int, timeout: float = 120.0) -> list[Outcome]:
    """Every case sent once, by `clients` clients each sending its next as soon as it has its answer."""
    return asyncio.run(_send(url, cases, clients, timeout))


def problems(cases: Sequence[Case], outcomes: Sequence[Outcome]) -> list[str]:
    """What went wrong: a case with no answer, the wrong status, or an answer that is not the expected one."""
    found = [f"case {i}: no answer" for i in sorted(set(range(len(cases))) - {o.case for o in outcomes})]
    for o in outcomes:
        case = cases[o.case]
        if o.status != case.status:
            found.append(f"case {o.case}: status {o.status}, expected {case.status}: {o.body[:200]!r}")
            continue
        try:
            answer = json.loads(o.body)
        except ValueError:
            found.append(f"case {o.case}: an answer that is not JSON: {o.body[:200]!r}")
            continue
        if case.status != 200:
            if not isinstance(answer.get("error"), str) or not answer["error"]:
                found.append(f"case {o.case}: a {o.status} without a message: {o.body[:200]!r}")
        elif tuple(tuple(hs[0]["tokens"]) for hs in answer.get("outputs", [])) != case.tokens:
            found.append(f"case {o.case}: tokens {answer.get('outputs')!r:.200} where the runtime gives "
                         f"{case.tokens!r:.200}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """`edgeformer serve BUNDLE` in a process (and session) of its own, on a free loopback port, until closed."""

    def __init__(self, bundle: Path, *flags: str, start_timeout: float = 180.0, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # ports of their own for HAProxy's stats and metrics: a stopped service's HAProxy may linger a while
        env = {**os.environ, "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
               "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
        self.process = subprocess.Popen([sys.executable, "-m", "edgeformer.cli", "serve", str(bundle), "--port",
                                         str(self.port), *flags], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        deadline = time.monotonic() + start_timeout
        while not self.healthy():  # once the replicas answer
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"edgeformer serve {bundle} did not start (exit {self.process.returncode})")
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def close(self) -> int:
        """SIGTERM, as a supervisor stops it; its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def p99(ms: Sequence[float]) -> float:
    """The 99th percentile of sorted latencies (the nearest rank)."""
    return ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]


def point(url: str, cases: Sequence[Case], clients: int) -> dict[str, Any]:
    send(url, cases[:clients * 2], clients)  # warm-up: every connection opened, the replica's first batches run
    start = time.perf_counter()
    outcomes = send(url, cases, clients)
    seconds = time.perf_counter() - start
    wrong = problems(cases, outcomes)
    ms = sorted(o.seconds * 1000 for o in outcomes)
    return {"clients": clients, "requests": len(cases), "seconds": seconds, "rps": len(cases) / seconds,
            "p50_ms": statistics.median(ms), "p99_ms": p99(ms),
            "problems": len(wrong), "first_problems": wrong[:3]}


def thread_flags(threads: str) -> tuple[str, ...]:
    """serve's flags for a replica's threads: "default" (serve's own, a replica's CPUs), or a count."""
    return () if threads == "default" else ("--threads", threads)


def grid(bundle: Path, clients: Sequence[int], max_batch: int, wait_ms: float, per_client: int,
         proxies: Sequence[str], rounds: int, out: Path | None,
         threads: Sequence[str] = ("default",)) -> list[dict[str, Any]]:
    """Every point in each of `rounds` interleaved rounds (batching on, then off, a fresh service each, for each
    proxy and each replica's --threads); the ratios are taken within a round, and the table gives the medians over
    rounds."""
    cases = good_cases(bundle, max(200, per_client * max(clients)))
    cost = model_cost(bundle, max_batch)
    print(f"the model alone, one thread: {min(cost['alone']):.2f}-{max(cost['alone']):.2f} ms a request; in a batch "
          f"of {max_batch}: {min(cost['batched']):.2f}-{max(cost['batched']):.2f}", flush=True)
    measured = []
    for round_ in range(1, rounds + 1):
        for proxy, thread in ((p, t) for p in proxies for t in threads):
            mine = []
            for batching, batch in (("on", max_batch), ("off", 1)):
                with Service(bundle, "--max-batch", str(batch), "--batch-wait-ms", str(wait_ms), "--proxy", proxy,
                             *thread_flags(thread)) as service:
                    for c in clients:
                        row = {"round": round_, "proxy": proxy, "threads": thread, "batching": batching,
                               "max_batch": batch,
                               **point(f"{service.url}/v1/generate", cases[:max(200, per_client * c)], c)}
                        print(f"round {round_} proxy {proxy:7} threads {thread:7} batching {batching:3} clients {c:4}: "
                              f"{row['rps']:7.1f} requests/s, p50 {row['p50_ms']:7.1f} ms, p99 {row['p99_ms']:7.1f} "
                              f"ms, {row['problems']} problems", flush=True)
                        mine.append(row)
            for c in clients:
                on, off = (next(r for r in mine if r["batching"] == b and r["clients"] == c) for b in ("on", "off"))
                on["vs_off"] = on["rps"] / off["rps"]
            for batching in ("on", "off"):  # the single-request latency: one client, the same service
                same = [r for r in mine if r["batching"] == batching]
                single = next(r["p50_ms"] for r in same if r["clients"] == min(clients))
                for r in same:
                    r["p99_vs_single"] = r["p99_ms"] / single
            measured += mine
    rows = medians(measured)
    if out is not None:
        write(rows, measured, cost, out)
    return rows


def medians(measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per proxy, threads, batching and clients: the median over rounds of each figure and ratio."""
    rows = []
    for key in dict.fromkeys((r["proxy"], r["threads"], r["batching"], r["clients"]) for r in measured):
        same = [r for r in measured if (r["proxy"], r["threads"], r["batching"], r["clients"]) == key]
        row = {"proxy": key[0], "threads": key[1], "batching": key[2], "clients": key[3], "rounds": len(same),
               "requests": same[0]["requests"], "problems": sum(r["problems"] for r in same)}
        for figure in ("rps", "p50_ms", "p99_ms", "vs_off", "p99_vs_single"):
            if figure in same[0]:
                row[figure] = statistics.median(r[figure] for r in same)
        if "vs_off" in same[0]:
            row["vs_off_range"] = [min(r["vs_off"] for r in same), max(r["vs_off"] for r in same)]
        row["p99_vs_single_range"] = [min(r["p99_vs_single"] for r in same), max(r["p99_vs_single"] for r in same)]
        rows.append(row)
    return rows


def write(rows: list[dict[str, Any]], measured: list[dict[str, Any]], cost: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    from edgeformer.benchmarks.sweep import machine, replace_file
    from edgeformer.report.format import table

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    replace_file(out / "results.json", lambda p: p.write_text(json.dumps(
        {"machine": machine(), "model_ms_a_request": cost, "records": rows, "rounds": measured}, indent=1) + "\n"))

    def spread(r: dict[str, Any], key: str) -> str:
        low, high = r[f"{key}_range"]
        return f"{r[key]:.2f}x ({low:.2f}-{high:.2f})"

    lines = [[r["proxy"], r["threads"], r["batching"], r["clients"], r["requests"], f"{r['rps']:.1f}",
              f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", spread(r, "vs_off") if "vs_off" in r else "",
              spread(r, "p99_vs_single"), r["problems"]] for r in rows]
    replace_file(out / "results.md", lambda p: p.write_text(
        f"medians of {rows[0]['rounds']} interleaved rounds; ratios within a round, (lowest-highest)\n\n" + table(
            ["proxy", "threads", "batching", "clients", "requests", "requests/s", "p50 ms", "p99 ms", "vs off",
             "p99 vs single", "problems"], lines) + "\n"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for proxy, thread, batching in dict.fromkeys((r["proxy"], r["threads"], r["batching"]) for r in rows):
        points = sorted((r["clients"], r["rps"], r["p99_ms"]) for r in rows
                        if (r["proxy"], r["threads"], r["batching"]) == (proxy, thread, batching))
        label = f"{proxy} proxy, threads {thread}, batching {batching}"
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        right.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
    for ax, label in ((left, "requests/s"), (right, "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    replace_file(out / "serve.png", lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    print(f"results in {out}")


def mixed(bundle: Path, n: int, clients: int, max_batch: int, proxy: str, threads: str = "default") -> list[str]:
    cases = mixed_cases(bundle, n)
    with Service(bundle, "--max-batch", str(max_batch), "--proxy", proxy, *thread_flags(threads)) as service:
        start = time.perf_counter()
        outcomes = send(f"{service.url}/v1/generate", cases, clients)
        seconds = time.perf_counter() - start
    wrong = problems(cases, outcomes)
    refused = sum(c.status != 200 for c in cases)
    print(f"{n} mixed requests ({refused} bad ones) from {clients} clients in {seconds:.1f} s: {len(wrong)} lost or "
          "mangled" + "".join(f"\n  {w}" for w in wrong[:10]))
    by_strategy: dict[str, list[float]] = {}  # the good requests' latencies, by what they ask
    for o in outcomes:
        if cases[o.case].status == 200:
            strategy = json.loads(cases[o.case].body).get("strategy", "greedy")
            by_strategy.setdefault(strategy, []).append(o.seconds * 1000)
    for strategy, ms in sorted(by_strategy.items()):
        ms.sort()
        print(f"  {strategy:6} {len(ms):5} requests: p50 {statistics.median(ms):6.1f} ms, p99 {p99(ms):6.1f} ms")
    return wrong


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("grid", help="requests/s and latency by clients, batching on and off")
    p.add_argument("bundle", type=Path)
    p.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--per-client", type=int, default=20, help="requests per client at each point (at least 200)")
    p.add_argument("--proxies", default="ray,haproxy", help="the services' --proxy, each measured in turn")
    p.add_argument("--threads", default="default",
                   help="the replicas' --threads, each measured in turn (default: serve's own, a replica's CPUs)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table gives their medians")
    p.add_argument("--out", type=Path, default=None)
    p = verbs.add_parser("mixed", help="many mixed requests, good and bad: every answer checked")
    p.add_argument("bundle", type=Path)
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--proxy", default="ray")
    p.add_argument("--threads", default="default", help="the replica's --threads (default: serve's own)")
    args = parser.parse_args(argv)
    if args.verb == "grid":
        grid(args.bundle, [int(c) for c in args.clients.split(",")], args.max_batch, args.batch_wait_ms,
             args.per_client, args.proxies.split(","), args.rounds, args.out, args.threads.split(","))
    elif mixed(args.bundle, args.requests, args.clients, args.max_batch, args.proxy, args.threads):
        sys.exit(1)


if __name__ == "__main__":
    main()
