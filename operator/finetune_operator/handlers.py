"""Thin kopf handlers: each records what a watch saw in the ClusterView (kopf's `memo.view`) and
queues the FineTuneJob's key for the reconcile workers (`memo.queue`). They are async and never
block or call the API: all API work happens in the workers.

Only event handlers, no change handlers: kopf then writes nothing of its own (no progress or
diff-base bookkeeping in status, no finalizer), so a stopped operator never blocks `kubectl
delete`, and deletion is left to owner references and the garbage collector.
"""

from __future__ import annotations

from typing import Any

import kopf

from finetune_api import GROUP, PLURAL, VERSION, contract

from finetune_operator.config import OperatorConfig

TRAINER_LABELS = {contract.LABEL_COMPONENT: contract.COMPONENT_TRAINER,
                  contract.LABEL_MANAGED_BY: contract.MANAGED_BY}
TRAINER_SELECTOR = ",".join(f"{k}={v}" for k, v in TRAINER_LABELS.items())


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf builds a diff-base (a deep copy of the body, less system fields) on every event for
    change handlers to compare; this operator has none, so nothing is built or kept (it was an
    eighth of the operator's CPU in a burst)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """kopf settings: no peering (the Lease in `runtime` decides who acts), server-side label
    selectors so the pod and Job watches carry only trainers. Were kopf ever to keep
    bookkeeping, it would be in status, never in annotations a GitOps tool owns."""
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.finalizer = f"{GROUP}/finalizer"  # never added: no handler needs it
    settings.peering.standalone = True
    # Needs no RBAC on CustomResourceDefinitions or Namespaces: resources are discovered once.
    settings.scanning.disabled = True
    settings.watching.label_selectors["batch", "v1", "jobs"] = TRAINER_SELECTOR
    settings.watching.label_selectors["v1", "pods"] = TRAINER_SELECTOR
    # Watch streams that end silently are restarted rather than trusted forever.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.posting.enabled = False  # Events are posted by the Reconciler on phase changes
    # Handlers are async; kopf's thread pool is not used.
    settings.execution.max_workers = 1


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    configure(settings, memo.config)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_seen(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    key = (body.metadata.namespace, body.metadata.name)
    if type == "DELETED":
        memo.view.forget(*key)
        memo.queue.forget(key)
        return
    if memo.view.put_finetunejob(dict(body)):
        memo.queue.add(key, first=memo.view.awaits_children(key))


@kopf.on.event("batch", "v1", "jobs", labels=TRAINER_LABELS)
async def trainer_job_seen(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    key = memo.view.put_job(dict(body), deleted=type == "DELETED")
    if key:
        memo.queue.add(key)


@kopf.on.event("v1", "pods", labels=TRAINER_LABELS)
async def trainer_pod_seen(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    key = memo.view.put_pod(dict(body), deleted=type == "DELETED")
    if key:
        memo.queue.add(key)
