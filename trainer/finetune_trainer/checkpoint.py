"""Full checkpoints for resume, written so that a crash at any moment leaves a usable "latest".

Layout under spec.checkpoint.uri (default <output.uri>/checkpoints/):

    epoch-0003.pt   torch.save of model, optimizer, scheduler, epoch, best metric, RNG, classes
    latest.json     pointer: the job's identity and the kept checkpoints, newest first, each with
                    its sha256

A checkpoint file is written completely before the pointer names it, and the pointer is replaced
atomically, so a reader never follows it to a partial file. On resume the newest entry whose
checksum matches and which loads is used; otherwise the one before it. The identity (namespace/
name and a hash of the spec fields that shape training) keeps a job from resuming another job's
checkpoints, or its own from before a spec change.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from finetune_trainer.storage import join_uri

POINTER_NAME = "latest.json"
# Spec fields whose change makes an old checkpoint meaningless for the new run.
TRAINING_FIELDS = ("dataset", "model", "strategy", "linearProbe", "freeze", "optimizer",
                   "schedule", "epochs", "batchSize", "augmentation", "labelSmoothing", "seed")


def job_identity(metadata: Mapping, spec: Mapping) -> dict:
    training = {field: spec.get(field) for field in TRAINING_FIELDS}
    spec_hash = hashlib.sha256(json.dumps(training, sort_keys=True).encode()).hexdigest()[:16]
    job = f"{metadata.get('namespace') or 'default'}/{metadata.get('name') or 'local'}"
    return {"job": job, "specHash": spec_hash}


def checkpoint_uri(spec: Mapping) -> str:
    return spec["checkpoint"].get("uri") or join_uri(spec["output"]["uri"], "checkpoints/")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class LoadedCheckpoint:
    state: dict
    uri: str
    epoch: int


class Checkpoints:
    def __init__(self, store, uri: str, identity: Mapping, *, keep: int, log=print):
        self.store, self.uri, self.identity, self.keep, self.log = store, uri, dict(identity), keep, log

    def _read_pointer(self) -> dict | None:
        pointer_uri = join_uri(self.uri, POINTER_NAME)
        if not self.store.exists(pointer_uri):
            return None
        try:
            return json.loads(self.store.read_bytes(pointer_uri))
        except ValueError:
            self.log(f"checkpoint pointer {pointer_uri} is unreadable; starting fresh")
            return None

    def save(self, state: Mapping, epoch: int) -> str:
        """Write the checkpoint of `epoch` (epochs completed), then point latest.json at it, then
        delete the checkpoints beyond spec.checkpoint.keep."""
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        data = buffer.getvalue()
        name = f"epoch-{epoch:04d}.pt"
        uri = join_uri(self.uri, name)
        self.store.write_bytes(uri, data)
        pointer = self._read_pointer()
        previous = pointer["checkpoints"] if pointer and pointer.get("identity") == self.identity else []
        entry = {"file": name, "epoch": epoch, "sha256": hashlib.sha256(data).hexdigest(),
                 "bytes": len(data), "time": datetime.now(timezone.utc).isoformat()}
        kept = [entry] + [e for e in previous if e["file"] != name][:self.keep]
        self.store.write_bytes(join_uri(self.uri, POINTER_NAME),
                               json.dumps({"identity": self.identity, "checkpoints": kept},
                                          indent=1).encode())
        for dropped in [e for e in previous if e["file"] != name][self.keep:]:
            try:
                self.store.delete(join_uri(self.uri, dropped["file"]))
            except Exception as error:  # noqa: BLE001 - a leftover file is harmless
                self.log(f"could not delete old checkpoint {dropped['file']}: {error}")
        return uri

    def load_latest(self) -> LoadedCheckpoint | None:
        """The newest valid checkpoint of this job and spec, or None."""
        pointer = self._read_pointer()
        if pointer is None:
            return None
        if pointer.get("identity") != self.identity:
            self.log(f"checkpoints at {self.uri} belong to {pointer.get('identity')}, not "
                     f"{self.identity}; starting fresh")
            return None
        for entry in pointer.get("checkpoints", []):
            uri = join_uri(self.uri, entry["file"])
            try:
                data = self.store.read_bytes(uri)
            except Exception as error:  # noqa: BLE001 - fall back to the previous checkpoint
                self.log(f"checkpoint {uri} unreadable ({error}); trying the previous one")
                continue
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                self.log(f"checkpoint {uri} does not match its checksum; trying the previous one")
                continue
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001
                self.log(f"checkpoint {uri} does not load ({error}); trying the previous one")
                continue
            return LoadedCheckpoint(state=state, uri=uri, epoch=entry["epoch"])
        return None
