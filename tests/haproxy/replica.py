"""``stemme serve`` for tests/test_haproxy.py, with one test hook: after its drain (SIGTERM: sessions told, turns
finished, sessions closed with 1001) the replica keeps its port open until the test has read its final
``/metrics``, i.e. until the file named by STEMME_TEST_RELEASE exists (at most 60 s), then stops as usual. Without
the hook the port closes within milliseconds of the last session, and a scrape can miss the last turn's counters.
Nothing else differs from ``stemme serve``.

    python tests/haproxy/replica.py --port 8001 [serve options]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from stemme.streaming.server import StemmeServer

from stemme.cli import main

HOLD_S = 60.0
_drain = StemmeServer.drain


async def _drain_then_hold(self: StemmeServer) -> None:
    await _drain(self)
    release = Path(os.environ["STEMME_TEST_RELEASE"])
    deadline = time.monotonic() + HOLD_S
    while not release.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    StemmeServer.drain = _drain_then_hold  # type: ignore[method-assign]
    sys.exit(main(["serve", *sys.argv[1:]]))
