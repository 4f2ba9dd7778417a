"""Which event loop the gateway runs on: uvloop when installed (``auto``), or asyncio's own.

One place, so the gateway (``server/cli.py``, ``--loop``) and the benchmark's floor servers
(``lab/floors/echo_server.py``, ``lab/floors/bare_server.py``) run on the same loop: a floor
measured on another loop than the gateway's is not its floor (uvloop costs 12-25 % less CPU per
forwarded request here, docs/gateway.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from server.errors import ConfigError

LOOPS = ("auto", "uvloop", "asyncio")


def run_loop(main: Coroutine[Any, Any, None], loop: str = "auto") -> None:
    """Run ``main`` on uvloop (``auto``: when it is installed) or on asyncio's own loop."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                main.close()
                raise ConfigError("--loop uvloop: uvloop is not installed") from None
        else:
            uvloop.run(main)
            return
    asyncio.run(main)
