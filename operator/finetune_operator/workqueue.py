"""A work queue of FineTuneJob keys, as client-go's: a key is queued at most once, never handed to
two workers at once (a key added while it is being worked on is queued again when that work is
done), and may be added after a delay (a retry with backoff, a deadline coming up).

Watch events only add keys; workers take a key and reconcile from what is observed then, so a
burst of events for one FineTuneJob costs one reconciliation, not one per event.

Two lanes: keys added with `first=True` (FineTuneJobs whose trainer Job is still to be made) are
handed out before all others. In a burst, every FineTuneJob gets its Job before any of them gets
its status refreshed (the Reconciler defers the status while `creations_waiting`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Hashable

BASE_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 60.0


class WorkQueue:
    def __init__(self) -> None:
        # One token per lane entry; an entry whose key was already handed out (it was moved to
        # the first lane, or taken from it) is skipped.
        self._tokens: asyncio.Queue[None] = asyncio.Queue()
        self._first_lane: deque[Hashable] = deque()
        self._lane: deque[Hashable] = deque()
        self._queued: dict[Hashable, bool] = {}  # key -> in the first lane
        self._active: set[Hashable] = set()
        self._dirty: dict[Hashable, bool] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._failures: dict[Hashable, int] = {}

    def add(self, key: Hashable, first: bool = False) -> None:
        if key in self._active:
            self._dirty[key] = self._dirty.get(key, False) or first
        elif key not in self._queued or (first and not self._queued[key]):
            self._queued[key] = first
            (self._first_lane if first else self._lane).append(key)
            self._tokens.put_nowait(None)

    @property
    def creations_waiting(self) -> bool:
        """Keys wait in the first lane (read from the reconcile threads: a deque's truth is
        one atomic operation)."""
        return bool(self._first_lane)

    def add_after(self, key: Hashable, delay: float) -> None:
        """Queue the key in `delay` seconds; an earlier pending time for it wins."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        pending = self._timers.get(key)
        if pending is not None and not pending.cancelled() and pending.when() <= when:
            return
        if pending is not None:
            pending.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> Hashable:
        while True:
            await self._tokens.get()
            lane = self._first_lane if self._first_lane else self._lane
            key = lane.popleft()
            if key in self._queued:
                break
        del self._queued[key]
        self._active.add(key)
        return key

    def done(self, key: Hashable) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self.add(key, first=self._dirty.pop(key))

    def retry(self, key: Hashable) -> float:
        """Queue a key whose work failed, after a per-key exponential backoff; returns it."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = min(MAX_BACKOFF_SECONDS, BASE_BACKOFF_SECONDS * 2 ** (failures - 1))
        self.add_after(key, delay)
        return delay

    def succeeded(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def forget(self, key: Hashable) -> None:
        """Drop a pending delayed add and the failure count (the object is gone); a queued key
        is reconciled once more and finds nothing to do."""
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def delayed(self) -> int:
        return len(self._timers)
