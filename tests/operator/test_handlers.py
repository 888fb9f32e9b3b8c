"""Guards on the kopf wiring that unit tests of the pure modules cannot see."""

import inspect

import kopf

from finetune_operator import handlers
from finetune_operator.config import OperatorConfig


def test_only_async_event_handlers_so_kopf_writes_nothing_and_adds_no_finalizer():
    registry = kopf.get_default_registry()
    # Change handlers (create/update/resume) make kopf patch its progress and diff-base into
    # every object; timers and daemons add a finalizer. The operator uses neither.
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()
    watching = registry._watching.get_all_handlers()
    assert len(watching) == 3
    assert all(inspect.iscoroutinefunction(h.fn) for h in watching)


def test_kopf_keeps_its_bookkeeping_in_status_and_watches_only_trainers():
    settings = kopf.OperatorSettings()
    handlers.configure(settings, OperatorConfig())
    assert isinstance(settings.persistence.progress_storage, kopf.StatusProgressStorage)
    # No change handlers, so no diff-base: none is built per event, and none is ever written.
    diffbase = settings.persistence.diffbase_storage
    body = kopf.Body({"metadata": {"name": "flowers", "namespace": "team-a"},
                      "spec": {"epochs": 3}, "status": {"phase": "Running"}})
    assert diffbase.build(body=body) == {}
    assert diffbase.fetch(body=body) is None
    patch = kopf.Patch()
    diffbase.store(body=body, patch=patch, essence=kopf.BodyEssence({"spec": {"epochs": 3}}))
    assert not patch
    assert settings.posting.enabled is False
    assert settings.scanning.disabled is True
    selectors = dict(settings.watching.label_selectors.items())
    assert set(selectors.values()) == {handlers.TRAINER_SELECTOR}
    assert len(selectors) == 2
