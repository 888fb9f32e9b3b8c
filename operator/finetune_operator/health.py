"""Liveness that notices a stalled watch, not only a dead process.

kopf reconnects a watch stream that stays silent past its inactivity timeout (the API server
sends bookmarks every minute), but a stream can also hang in a way no timeout sees, or keep
failing to reconnect. So the leader compares, every `watch_check_seconds`, the FineTuneJobs the
API lists (name and resourceVersion only) with those its watch delivered: an object whose
version in the API has not changed since the previous check and still differs from what the
watch delivered has been missed for a whole interval. Then /healthz answers 503 and the kubelet
restarts the operator, whose fresh watches list everything again.

/healthz is served on the event loop, so a loop that no longer runs fails it too. Followers
answer 200 while they wait for the Lease.
"""

from __future__ import annotations

import logging
from typing import Callable

from aiohttp import web

log = logging.getLogger(__name__)
Key = tuple[str, str]
Versions = dict[Key, int]


class WatchCheck:
    """Decides from two listings in a row whether the watch missed a change."""

    def __init__(self) -> None:
        self._lagging: Versions = {}  # key -> API version, not delivered at the last check
        self.stalled: list[Key] = []

    def check(self, listed: Versions, delivered: Versions) -> list[Key]:
        """`listed`: the API's versions now; `delivered`: the watch's. Returns the keys the
        watch has missed for a whole interval (gone from the API counts as version -1)."""
        lagging = {key: version for key, version in listed.items()
                   if delivered.get(key, -1) < version}
        lagging.update({key: -1 for key in delivered.keys() - listed.keys()})
        self.stalled = sorted(key for key, version in lagging.items()
                              if self._lagging.get(key) == version)
        self._lagging = lagging
        return self.stalled


class Health:
    def __init__(self) -> None:
        self.problem: str | None = None

    def watch_checked(self, stalled: list[Key]) -> None:
        if stalled:
            shown = ", ".join(f"{ns}/{name}" for ns, name in stalled[:5])
            self.problem = (f"the FineTuneJob watch missed changes for a whole check interval: "
                            f"{shown}{' ...' if len(stalled) > 5 else ''}")
            log.error("%s; reporting unhealthy so that the operator is restarted", self.problem)
        else:
            self.problem = None


async def serve(health: Health, addr: str, port: int) -> Callable[[], object]:
    async def healthz(_: web.Request) -> web.Response:
        if health.problem:
            return web.Response(status=503, text=health.problem + "\n")
        return web.Response(text="ok\n")

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz)])
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, addr, port).start()
    return runner.cleanup
