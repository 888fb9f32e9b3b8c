"""A work queue of FineTuneJob keys, as client-go's: a key is queued at most once, never handed to
two workers at once (a key added while it is being worked on is queued again when that work is
done), and may be added after a delay (a retry with backoff, a deadline coming up).

Watch events only add keys; workers take a key and reconcile from what is observed then, so a
burst of events for one FineTuneJob costs one reconciliation, not one per event.
"""

from __future__ import annotations

import asyncio
from typing import Hashable

BASE_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 60.0


class WorkQueue:
    def __init__(self) -> None:
        self._ready: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._active: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._failures: dict[Hashable, int] = {}

    def add(self, key: Hashable) -> None:
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.put_nowait(key)

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
        key = await self._ready.get()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: Hashable) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

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
