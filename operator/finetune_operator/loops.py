"""Operator-wide background loops, run next to kopf on the leader only: reading trainers'
progress, deleting finished FineTuneJobs after their TTL, failing jobs whose trainer could not
start within the grace, and retrying status refreshes that failed. Not kopf timers: those add a
finalizer to every object they serve, and a finalizer would block deletion while the operator is
down."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Any

import aiohttp

from finetune_operator import metrics
from finetune_operator.builders import CONTAINER_NAME
from finetune_operator.progress import parse_exposition
from finetune_operator.reconciler import Reconciler
from finetune_operator.status import RUNNING, TERMINAL_PHASES, parse_time

log = logging.getLogger(__name__)
SCRAPE_TIMEOUT_SECONDS = 3
DEADLINE_SWEEP_SECONDS = 2


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


def running_targets(reconciler: Reconciler) -> list[tuple[str, str, str]]:
    targets = []
    for finetunejob in reconciler.view.finetunejobs():
        meta = finetunejob["metadata"]
        if (finetunejob.get("status") or {}).get("phase") != RUNNING:
            continue
        job = reconciler.view.job(meta["namespace"], meta["name"], meta["uid"])
        if job is None:
            continue
        for pod in reconciler.view.pods(job):
            url = metrics_url(pod)
            if url and not pod["metadata"].get("deletionTimestamp"):
                targets.append((meta["namespace"], meta["name"], url))
                break
    return targets


async def _read_progress(reconciler: Reconciler, session: aiohttp.ClientSession,
                         namespace: str, name: str, url: str) -> None:
    try:
        async with session.get(url) as response:
            response.raise_for_status()
            text = await response.text()
        samples = parse_exposition(text)
        await asyncio.to_thread(reconciler.record_progress, namespace, name, samples)
        metrics.progress_reads.labels("success").inc()
    except Exception as error:  # a trainer between epochs or restarting: next round
        metrics.progress_reads.labels("error").inc()
        log.debug("progress of %s/%s from %s: %s", namespace, name, url, error)


async def progress_loop(reconciler: Reconciler, interval: float) -> None:
    timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            targets = running_targets(reconciler)
            await asyncio.gather(*(_read_progress(reconciler, session, *t) for t in targets))
            await asyncio.sleep(interval)


def expired(finetunejob: dict[str, Any], now: datetime) -> bool:
    status = finetunejob.get("status") or {}
    ttl = (finetunejob.get("spec") or {}).get("ttlSecondsAfterFinished")
    if ttl is None or status.get("phase") not in TERMINAL_PHASES:
        return False
    finished = parse_time(status.get("completionTime"))
    return finished is not None and (now - finished).total_seconds() >= ttl


def start_error_overdue(finetunejob: dict[str, Any], now: datetime, grace_seconds: int) -> bool:
    """The trainer container has been unable to start for longer than the grace: a missing
    Secret changes nothing in the pod, so no watch event would bring the job's status up."""
    status = finetunejob.get("status") or {}
    since = parse_time((status.get("startError") or {}).get("since"))
    return (since is not None and status.get("phase") not in TERMINAL_PHASES
            and (now - since).total_seconds() >= grace_seconds)


async def deadline_loop(reconciler: Reconciler) -> None:
    """Acts on FineTuneJobs whose time is up: deletes the finished ones past their TTL, and
    re-derives the status of those whose trainer could not start within the grace."""
    grace = reconciler.config.start_error_grace_seconds
    while True:
        now = datetime.now(timezone.utc)
        for finetunejob in reconciler.view.finetunejobs():
            meta = finetunejob["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            try:
                if expired(finetunejob, now):
                    await asyncio.to_thread(reconciler.expire, finetunejob)
                elif start_error_overdue(finetunejob, now, grace):
                    await asyncio.to_thread(reconciler.refresh, meta["namespace"], meta["name"])
            except Exception as error:
                log.warning("acting on %s/%s at its deadline failed: %s", meta["namespace"],
                            meta["name"], error)
        await asyncio.sleep(DEADLINE_SWEEP_SECONDS)


async def retry_loop(reconciler: Reconciler, interval: float = 5) -> None:
    """Status refreshes from watch events are fire-and-forget in kopf; the ones that failed
    (API unavailable, conflict) are retried here until they succeed."""
    while True:
        await asyncio.sleep(interval)
        for namespace, name in reconciler.take_failed_refreshes():
            try:
                await asyncio.to_thread(reconciler.refresh, namespace, name)
            except Exception as error:
                reconciler.mark_refresh_failed(namespace, name)
                log.warning("refreshing %s/%s failed again: %s", namespace, name, error)
