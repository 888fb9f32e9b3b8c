"""Which strategy runs. A declared strategy runs as declared; `Auto` without pretrained weights is
FromScratch; `Auto` with them is the race on the job's own data (race.py, run by
train.auto_race), which decides from evidence rather than from a size threshold."""

from __future__ import annotations


def choose_strategy(requested: str, *, weights: str) -> tuple[str, str]:
    """(strategy, reason) for spec.strategy `requested`; "Auto" means: race."""
    if requested != "Auto":
        return requested, "set in spec.strategy"
    if weights == "None":
        return "FromScratch", "Auto: spec.model.weights is None, so there are no pretrained features"
    return "Auto", "Auto: race of the candidate strategies on this job's data"
