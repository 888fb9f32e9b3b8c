"""Full checkpoints for resume, written so that a crash at any moment leaves a usable "latest".

Layout under spec.checkpoint.uri (default <output.uri>/checkpoints/):

    epoch-0003.pt             torch.save of model, optimizer, scheduler, epoch, best metric, RNG,
                              classes: the state after 3 complete epochs
    epoch-0003-step-00017.pt  the same, 17 optimizer steps into epoch 4 (a graceful stop on
                              SIGTERM, preemption.py), with the partial epoch's statistics
    latest.json               pointer: the job's identity and the kept checkpoints, newest
                              first, each with its sha256, epoch, step and time

Checkpoint files go through a temporary file and boto3's transfer manager (multipart, parallel
parts) in both directions, so neither a save nor a load holds the serialized bytes in memory next
to the tensors, and checkpoints over S3's 5 GB single-PUT limit work.

A checkpoint file is written completely before the pointer names it, and the pointer is replaced
atomically, so a reader never follows it to a partial file. On resume the newest entry whose
checksum matches and which loads is used; otherwise the one before it. The identity (namespace/
name and a hash of the spec fields that shape training) keeps a job from resuming another job's
checkpoints, or its own from before a spec change.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from finetune_trainer.storage import join_uri, sha256_file

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


def checkpoint_name(epoch: int, step: int = 0) -> str:
    return f"epoch-{epoch:04d}.pt" if not step else f"epoch-{epoch:04d}-step-{step:05d}.pt"


def torch_load_problem(error: Exception) -> str:
    """One line saying why torch.load(..., weights_only=True) failed. torch's refusal of a pickle
    that names a Python object to call (os.system in a __reduce__, a whole pickled nn.Module)
    is several paragraphs; what matters is that nothing of it ran, and which object it named."""
    text = str(error)
    # "Unsupported global: GLOBAL builtins.exec was not an allowed global", or "Trying to load
    # unsupported GLOBAL posix.system whose module posix is blocked".
    named = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
    if named:
        return (f"refused without unpickling it: it names the Python object {named.group(1)}, "
                "not only tensors and plain data, and loading that could run code")
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    detail = " ".join(detail.split("Check the documentation of torch.load", 1)[0].split())
    if text.startswith("Weights only load failed"):
        return ("refused without unpickling it: not a file torch.load reads as tensors and plain "
                f"data only ({detail[:200]})")
    return detail[:300] or type(error).__name__


@dataclass
class LoadedCheckpoint:
    state: dict
    uri: str
    epoch: int
    step: int = 0
    entry: dict | None = None  # its entry in latest.json (time, sha256, bytes)


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

    def save(self, state: Mapping, epoch: int, step: int = 0) -> dict:
        """Write the checkpoint of `epoch` epochs completed and `step` steps into the next, then
        point latest.json at it, then delete the checkpoints beyond spec.checkpoint.keep.
        Returns the pointer's entry for it, with its `uri`."""
        name = checkpoint_name(epoch, step)
        uri = join_uri(self.uri, name)
        with tempfile.TemporaryDirectory(prefix="checkpoint-") as scratch:
            path = Path(scratch) / name
            torch.save(dict(state), path)
            entry = {"file": name, "epoch": epoch, "step": step, "sha256": sha256_file(path),
                     "bytes": path.stat().st_size}
            self.store.upload_file(path, uri)
        entry["time"] = datetime.now(timezone.utc).isoformat()
        pointer = self._read_pointer()
        previous = pointer["checkpoints"] if pointer and pointer.get("identity") == self.identity else []
        kept = [entry] + [e for e in previous if e["file"] != name][:self.keep]
        self.store.write_bytes(join_uri(self.uri, POINTER_NAME),
                               json.dumps({"identity": self.identity, "checkpoints": kept},
                                          indent=1).encode())
        for dropped in [e for e in previous if e["file"] != name][self.keep:]:
            try:
                self.store.delete(join_uri(self.uri, dropped["file"]))
            except Exception as error:  # noqa: BLE001 - a leftover file is harmless
                self.log(f"could not delete old checkpoint {dropped['file']}: {error}")
        return {**entry, "uri": uri}

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
            with tempfile.TemporaryDirectory(prefix="checkpoint-") as scratch:
                path = Path(scratch) / entry["file"]
                try:
                    self.store.download_file(uri, path)
                except Exception as error:  # noqa: BLE001 - fall back to the previous checkpoint
                    self.log(f"checkpoint {uri} unreadable ({error}); trying the previous one")
                    continue
                if sha256_file(path) != entry["sha256"]:
                    self.log(f"checkpoint {uri} does not match its checksum; trying the previous "
                             "one")
                    continue
                try:
                    # weights_only: a checkpoint file is as untrusted as the bucket it is in.
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as error:  # noqa: BLE001
                    self.log(f"checkpoint {uri} does not load ({torch_load_problem(error)}); "
                             "trying the previous one")
                    continue
            return LoadedCheckpoint(state=state, uri=uri, epoch=entry["epoch"],
                                    step=entry.get("step", 0), entry={**entry, "uri": uri})
        return None
