"""The trainer's one exception type: every expected failure names its cause, the spec field to
blame when there is one, and the exit code that tells the operator whether to retry."""

from __future__ import annotations

from finetune_api.contract import ExitCode


class TrainerError(Exception):
    def __init__(self, exit_code: ExitCode, message: str, field: str | None = None):
        self.exit_code = exit_code
        self.message = message
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)

    @property
    def reason(self) -> str:
        return self.exit_code.reason
