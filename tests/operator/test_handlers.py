"""Guards on the kopf wiring that unit tests of the pure modules cannot see."""

import asyncio
import copy
import inspect
from types import SimpleNamespace

import kopf

from finetune_operator import handlers
from finetune_operator.config import OperatorConfig
from finetune_operator.view import ClusterView
from finetune_operator.workqueue import WorkQueue

from operator_factories import finetunejob, job


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


def test_handlers_queue_what_tells_something_new_and_new_jobs_first():
    async def scenario():
        view, queue = ClusterView(), WorkQueue()
        memo = SimpleNamespace(view=view, queue=queue)

        def versioned(body, version):
            body = copy.deepcopy(body)
            body["metadata"]["resourceVersion"] = str(version)
            return kopf.Body(body)

        await handlers.trainer_job_seen(type="ADDED", body=versioned(job(), 5), memo=memo)
        await handlers.finetunejob_seen(type="ADDED", body=versioned(finetunejob(), 1),
                                        memo=memo)
        other = finetunejob(name="tulips")
        await handlers.finetunejob_seen(type="ADDED", body=versioned(other, 2), memo=memo)
        # tulips has no Job yet: it comes first; flowers (whose Job was seen) after it.
        assert len(queue) == 2
        assert queue.creations_waiting
        assert await queue.get() == ("team-a", "tulips")
        assert await queue.get() == ("team-a", "flowers")
        queue.done(("team-a", "tulips"))
        queue.done(("team-a", "flowers"))
        # The same versions again (the echo of the operator's own writes): nothing queued.
        await handlers.trainer_job_seen(type="MODIFIED", body=versioned(job(), 5), memo=memo)
        await handlers.finetunejob_seen(type="MODIFIED", body=versioned(finetunejob(), 1),
                                        memo=memo)
        assert len(queue) == 0
        await handlers.trainer_job_seen(type="MODIFIED", body=versioned(job(), 6), memo=memo)
        assert await queue.get() == ("team-a", "flowers")
        await handlers.trainer_job_seen(type="DELETED", body=versioned(job(), 7), memo=memo)
        assert len(queue) == 0  # flowers is being worked on: queued again when done
        queue.done(("team-a", "flowers"))
        assert await queue.get() == ("team-a", "flowers")

    asyncio.run(scenario())
