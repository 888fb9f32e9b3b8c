"""docs/argocd-health.lua run by a real Lua interpreter, the way Argo CD runs it: the object as the
global `obj`, the chunk returning {status, message}."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune_api.schema import CONDITION_TYPES, PHASES
from packaging_support import REPO, run

SCRIPT = REPO / "docs" / "argocd-health.lua"
# Argo CD embeds gopher-lua, a Lua 5.1 implementation: prefer a 5.1 interpreter.
LUA = next((shutil.which(n) for n in ("lua5.1", "luajit", "lua", "lua5.2", "lua5.3", "lua5.4")
            if shutil.which(n)), None)


def lua_literal(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # strings: JSON escapes are valid Lua escapes for these cases


def health(obj: dict) -> tuple[str, str]:
    if LUA is None:
        pytest.skip("no Lua interpreter (Debian package lua5.1) on this machine")
    program = (f"obj = {lua_literal(obj)}\n"
               f"local hs = dofile({json.dumps(str(SCRIPT))})\n"
               "io.write(hs.status, '\\n', hs.message or '')\n")
    result = run([LUA, "-e", program])
    assert result.returncode == 0, result.stderr
    status, _, message = result.stdout.partition("\n")
    return status, message


def cond(ctype: str, status: str = "True", message: str = "", **extra) -> dict:
    c = {"type": ctype, "status": status, "reason": ctype, **extra}
    if message:
        c["message"] = message
    return c


def job(phase: str | None = None, conditions: list[dict] | None = None, generation: int = 1,
        observed: int | None = 1, **status) -> dict:
    obj = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "j", "namespace": "team-a", "generation": generation}}
    if phase is not None or conditions is not None or status:
        obj["status"] = dict(status)
        if phase is not None:
            obj["status"]["phase"] = phase
        if conditions is not None:
            obj["status"]["conditions"] = conditions
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


@pytest.mark.parametrize("obj, expected", [
    (job("Succeeded", [cond("Valid"), cond("Running", "False"),
                       cond("Succeeded", message="accuracy 0.91")]), ("Healthy", "accuracy 0.91")),
    (job("Failed", [cond("Valid"), cond("Failed", message="InvalidData: one class")]),
     ("Degraded", "InvalidData: one class")),
    (job("Failed", failure={"reason": "DeadlineExceeded", "message": "ran 3600s"}),
     ("Degraded", "ran 3600s")),
    (job("Running", [cond("Valid"), cond("Running")], progress={"epochProgress": "3/10"}),
     ("Progressing", "Training, epoch 3/10")),
    (job("Running", [cond("Running", message="pod started")]), ("Progressing", "pod started")),
    (job("Pending", [cond("Valid")]), ("Progressing", "Phase Pending")),
    (job("Queued", [cond("Valid")]), ("Progressing", "Queued: waiting for capacity")),
    (job("Suspended", [cond("Valid"), cond("Suspended", message="spec.suspend is true")]),
     ("Suspended", "spec.suspend is true")),
    (job(None, [cond("Valid", "False", message="spec.epochs: must be at least 1")]),
     ("Degraded", "spec.epochs: must be at least 1")),
    (job(), ("Progressing", "Waiting for the operator to accept the FineTuneJob")),
    # The user edited spec (suspend: false) and the operator has not seen it yet.
    (job("Suspended", [cond("Suspended")], generation=3, observed=2),
     ("Progressing", "Waiting for the operator to observe the latest spec")),
    # Conditions win over a stale phase.
    (job("Running", [cond("Running", "False"), cond("Failed", message="OutOfMemory")]),
     ("Degraded", "OutOfMemory")),
], ids=["succeeded", "failed-condition", "failed-phase-only", "running-epoch", "running-message",
        "pending", "queued", "suspended", "invalid", "no-status", "stale-status", "condition-wins"])
def test_health(obj, expected):
    assert health(obj) == expected


@pytest.mark.parametrize("phase", PHASES)
def test_every_phase_maps_to_an_argo_status(phase):
    status, message = health(job(phase, []))
    assert status == {"Succeeded": "Healthy", "Failed": "Degraded", "Suspended": "Suspended"}.get(
        phase, "Progressing")
    assert message


def test_script_reads_only_known_condition_types():
    text = SCRIPT.read_text()
    for ctype in ("Failed", "Succeeded", "Suspended", "Valid", "Running"):
        assert ctype in CONDITION_TYPES
        assert f'"{ctype}"' in text
