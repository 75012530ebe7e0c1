"""Ray started here, or the cluster that RAY_ADDRESS names joined, with errors that say what to do."""

from __future__ import annotations

import math
import os
from typing import Any

from edgeformer.runtime.errors import EdgeformerError

# Ray 2.59 and later turn token authentication on in the clusters `ray start` makes, while a process that joins one
# sends no token unless told to
TOKEN_HINT = ("a cluster that Ray 2.59 or later started asks for its token: set RAY_AUTH_MODE=token, with the "
              "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on its head node)")


def actor_threads(threads: int | None, cpus: float) -> int:
    """A Ray actor's intra-op threads: those asked, else the CPUs Ray reserves for it (at least one), as Ray sets
    OMP_NUM_THREADS in its workers. onnxruntime's own default, a thread per core of the machine, has the actors of a
    node, and the HTTP proxy and the clients beside them, contend for every core (README: Serving)."""
    return threads if threads is not None else max(1, math.floor(cpus))


def init_ray(**options: Any) -> None:
    """ray.init(**options); EdgeformerError, with the likely fix, where the cluster RAY_ADDRESS names refuses us."""
    import ray

    try:
        ray.init(**options)
    except ConnectionError as e:
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            raise
        hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else f"; {TOKEN_HINT}"
        raise EdgeformerError(f"could not join the Ray cluster at {address} ({str(e).splitlines()[0]}){hint}"
                              ) from None


def serving_at(host: str, port: int) -> None:
    """EdgeformerError unless the cluster's Serve listens where asked: a cluster keeps one HTTP address for Serve
    from its first start, and Ray only warns when another is asked."""
    from ray.serve.context import _get_global_client  # the one way Ray tells which address its proxies have

    client = _get_global_client()  # raises where no Serve runs; serve.start has just made sure one does
    assert client is not None
    config = client.http_config
    if (config.host, config.port) != (host, port):
        raise EdgeformerError(f"Serve already runs on this Ray cluster at {config.host}:{config.port}, and a "
                              f"cluster keeps its first address: serve with --host {config.host} --port "
                              f"{config.port}, or stop it first (`serve shutdown`)")
