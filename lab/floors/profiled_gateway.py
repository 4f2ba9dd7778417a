"""The gateway CLI with cProfile switched on and off by signals, for steady-state profiles.

``python -m lab.floors.profiled_gateway PROFILE_FILE [precision-serve arguments...]`` runs
``server.cli.main`` in this process; SIGUSR1 starts profiling the main thread (the gateway's
event loop), SIGUSR2 stops it and writes the stats to PROFILE_FILE. Start-up and shutdown stay
out of the profile. (py-spy would sample every thread without this; it is not installed here.)
"""

from __future__ import annotations

import cProfile
import signal
import sys
from typing import Any


def main(argv: list[str]) -> int:
    target, rest = argv[0], argv[1:]
    profiler = cProfile.Profile()

    def start(*_: Any) -> None:
        profiler.enable()

    def stop(*_: Any) -> None:
        profiler.disable()
        profiler.dump_stats(target)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from server.cli import main as gateway_main

    return gateway_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
