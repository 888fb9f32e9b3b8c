"""Guards on the kopf wiring that unit tests of the pure modules cannot see."""

import kopf

from finetune_operator import handlers
from finetune_operator.config import OperatorConfig


def test_no_handler_makes_kopf_add_a_finalizer():
    registry = kopf.get_default_registry()
    changing = registry._changing.get_all_handlers()
    assert changing, "the create/resume/update handlers are registered"
    assert not any(h.requires_finalizer for h in changing)
    # kopf timers and daemons always add a finalizer: the operator uses its own loops instead.
    assert not registry._spawning.get_all_handlers()


def test_kopf_keeps_its_bookkeeping_in_status_and_watches_only_trainers():
    settings = kopf.OperatorSettings()
    handlers.configure(settings, OperatorConfig())
    assert isinstance(settings.persistence.progress_storage, kopf.StatusProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.StatusDiffBaseStorage)
    assert settings.posting.enabled is False
    assert settings.scanning.disabled is True
    selectors = dict(settings.watching.label_selectors.items())
    assert set(selectors.values()) == {handlers.TRAINER_SELECTOR}
    assert len(selectors) == 2
