"""How long a fine-tune trains when spec.epochs is left out, and the early stopping that then
keeps its best epoch.

Sized by optimizer steps, not epochs: one epoch of 100 images is 3 steps and one of 50000 is
1500, so a fixed epoch count either stops a small dataset long before it converges or trains a
large one far longer than it needs (docs/strategies.md measured both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# At least this many optimizer steps (docs/strategies.md: with a few hundred steps the
# fine-tunes converged at 100-2000 images; with 15-60 they did not)...
TARGET_STEPS = 300
# ...but never fewer epochs than this, nor more than this (100 images at batch 32: 100 epochs).
MIN_EPOCHS = 3
MAX_EPOCHS = 100
# Early stopping when the epochs were sized here: patience in epochs, a fifth of the run but at
# least this many, so a noisy validation split does not end a run in its first epochs.
MIN_PATIENCE = 5


def planned_epochs(spec: Mapping, steps_per_epoch: int) -> int:
    """spec.epochs when set; otherwise enough epochs for TARGET_STEPS optimizer steps, within
    [MIN_EPOCHS, MAX_EPOCHS] and past the spec's warmup and unfreezing epochs."""
    if spec.get("epochs"):
        return spec["epochs"]
    sized = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / max(1, steps_per_epoch))))
    after = max(spec["schedule"].get("warmupEpochs", 0), spec["freeze"].get("unfreezeAtEpoch") or 0)
    return max(sized, after + 1)


def early_stopping(spec: Mapping, epochs: int) -> dict | None:
    """spec.earlyStopping when set; with sized epochs, stop on validation accuracy after a fifth
    of the run without improvement; with spec.epochs and no earlyStopping, none."""
    if spec.get("earlyStopping"):
        return spec["earlyStopping"]
    if spec.get("epochs"):
        return None
    return {"patience": max(MIN_PATIENCE, epochs // 5), "metric": "ValAccuracy", "minDelta": 0.0}
