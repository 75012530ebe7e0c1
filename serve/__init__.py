"""Serving a bundle past one process, on Ray: an HTTP service with dynamic batching (Ray Serve, service.py) and
corpora across a cluster (Ray Data, corpus.py). Built on the runtime alone; Ray is the `serve` extra."""
