"""Thin kopf handlers: each hands what it saw to the Reconciler (passed as kopf's `memo`).

No handler here needs a finalizer: no delete handlers, no kopf timers or daemons (both would add
one); deletion is left to owner references and the garbage collector, so a stopped operator
never blocks `kubectl delete`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import kopf

from finetune_api import GROUP, PLURAL, VERSION, contract

from finetune_operator.config import OperatorConfig
from finetune_operator.reconciler import Reconciler, RetryLater

TRAINER_LABELS = {contract.LABEL_COMPONENT: contract.COMPONENT_TRAINER,
                  contract.LABEL_MANAGED_BY: contract.MANAGED_BY}
TRAINER_SELECTOR = ",".join(f"{k}={v}" for k, v in TRAINER_LABELS.items())


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """kopf settings: bookkeeping in status (never in annotations a GitOps tool owns), no
    peering (the Lease in __main__ decides who acts), server-side label selectors so the pod
    and Job watches carry only trainers."""
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.last-handled-configuration")
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
    settings.execution.max_workers = 16


def _reconciler(memo: Any) -> Reconciler:
    return memo.reconciler


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    configure(settings, memo.config)


@kopf.on.event(GROUP, VERSION, PLURAL)
def finetunejob_seen(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    raw = dict(body)
    if type == "DELETED":
        _reconciler(memo).forget(body.metadata.namespace, body.metadata.name)
    else:
        memo.view.put_finetunejob(raw)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile(body: kopf.Body, memo: Any, logger: logging.Logger, **_: Any) -> None:
    try:
        _reconciler(memo).reconcile(_plain(body))
    except RetryLater as error:
        raise kopf.TemporaryError(str(error), delay=error.delay) from error


@kopf.on.event("batch", "v1", "jobs", labels=TRAINER_LABELS)
def trainer_job_seen(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    key = memo.view.put_job(_plain(body), deleted=type == "DELETED")
    if key:
        _reconciler(memo).refresh_or_defer(*key)


@kopf.on.event("v1", "pods", labels=TRAINER_LABELS)
def trainer_pod_seen(type: str | None, body: kopf.Body, memo: Any, **_: Any) -> None:
    key = memo.view.put_pod(_plain(body), deleted=type == "DELETED")
    if key:
        _reconciler(memo).refresh_or_defer(*key)


def _plain(body: kopf.Body) -> dict[str, Any]:
    return copy.deepcopy(dict(body))
