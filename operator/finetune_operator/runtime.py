"""The running operator: metrics server, leader Lease, then kopf's watches, the reconcile
workers and the progress reader, all in one asyncio loop.

Concurrency: the loop never blocks. kopf's handlers are async and only record observations and
queue keys; every Kubernetes API call is made by sync code in one bounded pool of
`reconcile_workers` threads (the Reconciler, one key at a time) and, apart from it, by the
Lease keeper's own thread.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

# kopf imports kubernetes_asyncio (shipped inside the kubernetes wheel) only to recognise its
# model objects as handler results, which this operator never returns; skipping it saves ~45 MiB
# of resident memory and seconds of start-up.
sys.modules.setdefault("kubernetes_asyncio", None)

import kopf  # noqa: E402

from finetune_api import validation  # noqa: E402

from finetune_operator import handlers  # noqa: E402,F401  (registers the kopf handlers)
from finetune_operator import loops, metrics  # noqa: E402
from finetune_operator.config import OperatorConfig  # noqa: E402
from finetune_operator.health import Health, serve as serve_health  # noqa: E402
from finetune_operator.kube import Kube  # noqa: E402
from finetune_operator.leader import LeaseElector, LeaseKeeper  # noqa: E402
from finetune_operator.reconciler import Reconciler  # noqa: E402
from finetune_operator.view import ClusterView  # noqa: E402
from finetune_operator.workqueue import WorkQueue  # noqa: E402

log = logging.getLogger("finetune_operator")


async def run(config: OperatorConfig) -> None:
    # One pooled connection per worker, plus the Lease keeper's.
    kube = Kube(connections=config.reconcile_workers + 2, field_manager=config.identity)
    view = ClusterView()
    queue = WorkQueue()
    pool = ThreadPoolExecutor(config.reconcile_workers, thread_name_prefix="reconcile")
    reconciler = Reconciler(config, kube, view, lambda: queue.creations_waiting)
    # Before the watches start: a burst of FineTuneJobs is then not also the validator's build.
    await asyncio.to_thread(validation.prepare)
    metrics.serve(config.metrics_addr, config.metrics_port, view.phases)
    health = Health()
    stop_health = await serve_health(health, config.metrics_addr, config.health_port)
    log.info("metrics on %s:%d, /healthz on port %d", config.metrics_addr, config.metrics_port,
             config.health_port)

    elector = keeper = None
    if config.leader_election:
        # A Kube of its own: its connection is never busy with a reconciliation.
        elector = LeaseElector(Kube(connections=1), config.pod_namespace, config.lease_name,
                               config.identity, config.lease_duration_seconds)
        await asyncio.to_thread(elector.acquire)
        keeper = LeaseKeeper(elector)
        keeper.start()
        kube.fence = keeper.fence
    metrics.leader.set(1)

    background = [asyncio.create_task(coro) for coro in (
        loops.progress_loop(view, queue, pool, config.progress_interval_seconds),
        *(loops.reconcile_worker(queue, reconciler, pool)
          for _ in range(config.reconcile_workers)),
        loops.watch_check_loop(view, kube, pool, health, config.watch_namespaces,
                               config.watch_check_seconds),
        loops.memory_trim_loop(view, pool),
    )]
    try:
        await kopf.operator(
            standalone=True,
            # kopf's default identity asks the passwd database for the user, which has no entry
            # for the uid a pod runs as (65532 here): name it as the Lease does.
            identity=config.identity,
            clusterwide=not config.watch_namespaces,
            namespaces=list(config.watch_namespaces),
            memo=kopf.Memo(config=config, view=view, queue=queue),
        )
    finally:
        for task in background:
            task.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        await stop_health()
        metrics.leader.set(0)
        if keeper:
            keeper.stop()
        if elector:
            await asyncio.to_thread(elector.release)
