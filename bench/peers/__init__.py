"""The peers the gateway is compared with: KServe's Python ``ModelServer`` serving the same
variant (:mod:`bench.peers.kserve_peer`, a server) and NVIDIA's perf_analyzer
(:mod:`bench.peers.perf_analyzer`, a second client). Installed by ``make bench-tools``."""


class PeerError(RuntimeError):
    """A peer is missing, did not start, or answered something unreadable."""
