"""The operator's background work next to kopf's watches, on the leader only: the reconcile
workers, which take FineTuneJob keys off the WorkQueue and run the Reconciler in the bounded
pool, and the progress reader, which reads running trainers' /metrics and hands each reading to
the reconciliation as one more observation.

A trainer's /metrics is served by a tenant's pod, so it is read defensively: at most
MAX_METRICS_BYTES, within SCRAPE_TIMEOUT_SECONDS, parsed in the pool (never on the event loop),
keeping only the metric names the status uses. A huge, slow or garbled body costs one failed
read, not the operator's memory, its loop or its Lease.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from concurrent.futures import Executor
from typing import Any

import aiohttp

from finetune_operator import metrics
from finetune_operator.builders import CONTAINER_NAME
from finetune_operator.health import Health, WatchCheck
from finetune_operator.progress import parse_exposition
from finetune_operator.reconciler import Reconciler
from finetune_operator.status import RUNNING
from finetune_operator.view import ClusterView
from finetune_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)
SCRAPE_TIMEOUT_SECONDS = 3
MAX_METRICS_BYTES = 256 * 1024
SCRAPE_CONCURRENCY = 32
MEMORY_TRIM_SECONDS = 5


class TooLarge(ValueError):
    pass


def metrics_url(pod: dict[str, Any]) -> str | None:
    ip = (pod.get("status") or {}).get("podIP")
    if not ip or (pod.get("status") or {}).get("phase") != "Running":
        return None
    container = next((c for c in (pod.get("spec") or {}).get("containers") or []
                      if c.get("name") == CONTAINER_NAME), {})
    port = next((p.get("containerPort") for p in container.get("ports") or []
                 if p.get("name") == "metrics"), None)
    if not port:
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/metrics"


def running_targets(view: ClusterView) -> list[tuple[str, str, str]]:
    """(namespace, name, url) of one running trainer pod of each running FineTuneJob: with
    several workers, any pod serves rank 0's figures or its own, and the parser keeps rank 0."""
    targets = []
    for finetunejob in view.finetunejobs():
        meta = finetunejob["metadata"]
        if (finetunejob.get("status") or {}).get("phase") != RUNNING:
            continue
        job = view.job(meta["namespace"], meta["name"], meta["uid"])
        if job is None:
            continue
        pods = sorted(view.pods(job), key=_completion_index)
        for pod in pods:
            url = metrics_url(pod)
            if url and not pod["metadata"].get("deletionTimestamp"):
                targets.append((meta["namespace"], meta["name"], url))
                break
    return targets


def _completion_index(pod: dict[str, Any]) -> int:
    """Rank 0's pod first (an Indexed Job's pod names end in -<index>-<suffix>)."""
    parts = pod["metadata"].get("name", "").rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


async def read_capped(session: aiohttp.ClientSession, url: str,
                      limit: int = MAX_METRICS_BYTES) -> bytes:
    """The body at `url`, or TooLarge as soon as it passes `limit` bytes."""
    async with session.get(url) as response:
        response.raise_for_status()
        if response.content_length is not None and response.content_length > limit:
            raise TooLarge(f"{url} announces {response.content_length} bytes")
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"{url} sent more than {limit} bytes")
    return bytes(body)


def parse_body(body: bytes) -> dict[str, Any]:
    return parse_exposition(body.decode("utf-8", errors="replace"))


async def _read_progress(view: ClusterView, queue: WorkQueue, pool: Executor,
                         session: aiohttp.ClientSession, limiter: asyncio.Semaphore,
                         namespace: str, name: str, url: str) -> None:
    async with limiter:
        try:
            body = await read_capped(session, url)
            samples = await asyncio.get_running_loop().run_in_executor(pool, parse_body, body)
        except Exception as error:  # a trainer between epochs, restarting, or misbehaving
            metrics.progress_reads.labels("error").inc()
            log.debug("progress of %s/%s from %s: %s", namespace, name, url, error)
            return
    metrics.progress_reads.labels("success").inc()
    if samples != view.progress(namespace, name):
        view.put_progress(namespace, name, samples)
        queue.add((namespace, name))


async def progress_loop(view: ClusterView, queue: WorkQueue, pool: Executor,
                        interval: float) -> None:
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)
    limiter = asyncio.Semaphore(SCRAPE_CONCURRENCY)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            await asyncio.gather(*(_read_progress(view, queue, pool, session, limiter, *target)
                                   for target in running_targets(view)))
            await asyncio.sleep(interval)


async def watch_check_loop(view: ClusterView, kube: Any, pool: Executor, health: Health,
                           namespaces: tuple[str, ...], interval: float) -> None:
    check = WatchCheck()
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            listed = await loop.run_in_executor(pool, kube.finetunejob_versions, namespaces)
        except Exception as error:  # the API unreachable says nothing about the watch
            log.warning("listing FineTuneJobs to check the watch: %s", error)
            continue
        health.watch_checked(check.check(listed, view.finetunejob_versions()))


async def reconcile_worker(queue: WorkQueue, reconciler: Reconciler, pool: Executor) -> None:
    loop = asyncio.get_running_loop()
    while True:
        key = await queue.get()
        try:
            requeue = await loop.run_in_executor(pool, reconciler.sync, *key)
        except Exception as error:
            delay = queue.retry(key)
            log.warning("reconciling %s/%s failed, retrying in %.1f s: %s", *key, delay, error)
        else:
            queue.succeeded(key)
            if requeue is not None:
                queue.add_after(key, requeue)
        finally:
            queue.done(key)


def release_freed_memory() -> bool:
    """Hand the heap pages that deleted objects freed back to the system. glibc keeps them for
    reuse otherwise: after 1000 FineTuneJobs came and went the operator's RSS stayed at its
    peak. Reference cycles (asyncio's tasks and futures make some) are collected first. Works
    on small objects too where Python allocates them with malloc (the image sets
    PYTHONMALLOC=malloc). False where the C library has no malloc_trim (musl)."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


async def memory_trim_loop(view: ClusterView, pool: Executor,
                           interval: float = MEMORY_TRIM_SECONDS,
                           release=release_freed_memory) -> None:
    """After objects were forgotten, once per interval: release what they held."""
    loop = asyncio.get_running_loop()
    trimmed_at = view.forgotten
    while True:
        await asyncio.sleep(interval)
        if view.forgotten != trimmed_at:
            trimmed_at = view.forgotten
            await loop.run_in_executor(pool, release)
