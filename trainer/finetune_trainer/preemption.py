"""Graceful stops. SIGTERM (a preemption, an eviction, a node drain, spec.suspend) sets a flag;
the training loop reads it after each optimizer step, checkpoints that step and exits with
ExitCode.PREEMPTED, which the Job's pod failure policy retries without counting it against
backoffLimit. The pod's terminationGracePeriodSeconds (spec.checkpoint.preemptionGraceSeconds)
bounds the time this may take; if the step and the checkpoint do not fit, the kubelet's SIGKILL
leaves the previous complete checkpoint in place (checkpoint.py never names a partial file).

A Python process that is PID 1 of its container ignores SIGTERM unless it installs a handler,
so without this module a trainer pod would run on, unaware, until the SIGKILL.
"""

from __future__ import annotations

import signal
import threading
import time

from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError


class StopRequest:
    """Whether this process was asked to stop, and since when."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self.received_monotonic: float | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, signal_name: str = "request") -> None:
        if not self._event.is_set():
            self.signal_name, self.received_monotonic = signal_name, time.monotonic()
            self._event.set()

    def clear(self) -> None:
        self._event.clear()
        self.signal_name = self.received_monotonic = None

    def install(self, signals=(signal.SIGTERM,)) -> bool:
        """Handle `signals` in this process; False where that is not possible (not the main
        thread), in which case the default action stands."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in signals:
            signal.signal(signum, self._handle)
        return True

    def _handle(self, signum, _frame) -> None:
        self.request(signal.Signals(signum).name)


# The process's one stop request: the signal handler sets it, the training loop reads it.
STOP = StopRequest()


class Preempted(TrainerError):
    """Raised once the run has stopped: `checkpoint` is the pointer entry of the checkpoint the
    next run resumes from (None: there is none), `fresh` whether it was written for this stop
    (False: nothing was trained since it)."""

    def __init__(self, where: str, checkpoint: dict | None, *, fresh: bool):
        if checkpoint is None:
            saved = "no checkpoint yet: the next run starts over"
        elif fresh:
            saved = f"checkpoint {checkpoint['uri']} written; the next run resumes there"
        else:
            saved = (f"nothing trained since checkpoint {checkpoint['uri']}; the next run "
                     "resumes there")
        super().__init__(ExitCode.PREEMPTED,
                         f"stopped on {STOP.signal_name or 'request'} at {where}; {saved}")
        self.where, self.checkpoint, self.fresh = where, checkpoint, fresh
