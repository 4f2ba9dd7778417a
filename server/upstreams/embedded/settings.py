"""The embedded upstream's URL settings: ``--upstream embedded?threads=N``."""

from __future__ import annotations

from server.upstreams.base import QueryKey, UpstreamQuery, count

QUERY = UpstreamQuery(
    {
        "threads": QueryKey(
            "threads",
            count,
            "intra-op threads per engine session (0: the engine decides); 1 lowers the CPU per "
            "request of tiny models, cuts a heavy model's throughput",
        ),
    }
)
