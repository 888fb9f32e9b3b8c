"""The running operator: metrics server, leader Lease, then kopf with the handlers and the
background loops, all in one asyncio loop."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

# kopf imports kubernetes_asyncio (shipped inside the kubernetes wheel) only to recognise its
# model objects as handler results, which this operator never returns; skipping it saves ~45 MiB
# of resident memory and seconds of start-up.
sys.modules.setdefault("kubernetes_asyncio", None)

import kopf  # noqa: E402

from finetune_operator import handlers  # noqa: E402,F401  (registers the kopf handlers)
from finetune_operator import loops, metrics  # noqa: E402
from finetune_operator.config import OperatorConfig  # noqa: E402
from finetune_operator.kube import Kube  # noqa: E402
from finetune_operator.leader import LeaseElector  # noqa: E402
from finetune_operator.reconciler import Reconciler  # noqa: E402
from finetune_operator.view import ClusterView  # noqa: E402

log = logging.getLogger("finetune_operator")
EXIT_LOST_LEASE = 3


async def _keep_lease(elector: LeaseElector) -> None:
    last_renewed = time.monotonic()
    while True:
        await asyncio.sleep(elector.retry_seconds)
        try:
            if await asyncio.to_thread(elector.try_acquire_or_renew):
                last_renewed = time.monotonic()
                continue
            reason = "another replica holds the Lease"
        except Exception as error:  # API unreachable: keep trying until the deadline
            reason = str(error)
        if time.monotonic() - last_renewed > elector.renew_deadline_seconds:
            log.error("lost the leader Lease (%s); exiting so that only one replica acts", reason)
            logging.shutdown()
            os._exit(EXIT_LOST_LEASE)


async def run(config: OperatorConfig) -> None:
    kube = Kube()
    view = ClusterView()
    reconciler = Reconciler(config, kube, view)
    metrics.serve(config.metrics_addr, config.metrics_port, view.phases)
    log.info("metrics on %s:%d", config.metrics_addr, config.metrics_port)

    elector = None
    if config.leader_election:
        elector = LeaseElector(kube, config.pod_namespace, config.lease_name,
                               config.identity, config.lease_duration_seconds)
        await asyncio.to_thread(elector.acquire)
    metrics.leader.set(1)

    background = [asyncio.create_task(coro) for coro in (
        loops.progress_loop(reconciler, config.progress_interval_seconds),
        loops.deadline_loop(reconciler),
        loops.retry_loop(reconciler),
        *([_keep_lease(elector)] if elector else []),
    )]
    try:
        await kopf.operator(
            standalone=True,
            # kopf's default identity asks the passwd database for the user, which has no entry
            # for the uid a pod runs as (65532 here): name it as the Lease does.
            identity=config.identity,
            clusterwide=not config.watch_namespaces,
            namespaces=list(config.watch_namespaces),
            memo=kopf.Memo(config=config, view=view, reconciler=reconciler),
        )
    finally:
        for task in background:
            task.cancel()
        metrics.leader.set(0)
        if elector:
            await asyncio.to_thread(elector.release)
