"""Which strategy runs. `Auto` is resolved here, and only here, so that the rule is easy to find
and to replace (a later issue derives it from a measured study)."""

from __future__ import annotations

# Below this many training images a linear probe on frozen features usually matches fine-tuning
# at a fraction of the cost, and fine-tuning risks overfitting.
LINEAR_PROBE_MAX_TRAIN_IMAGES = 1000


def choose_strategy(requested: str, *, train_images: int, weights: str) -> tuple[str, str]:
    """(strategy, reason) for spec.strategy `requested` on a dataset of `train_images`."""
    if requested != "Auto":
        return requested, "set in spec.strategy"
    if weights == "None":
        return "FromScratch", "Auto: spec.model.weights is None, so there are no pretrained features"
    if train_images < LINEAR_PROBE_MAX_TRAIN_IMAGES:
        return "LinearProbe", (f"Auto: {train_images} training images < "
                               f"{LINEAR_PROBE_MAX_TRAIN_IMAGES}, a linear probe on frozen "
                               "features is the safer choice")
    return "FineTune", (f"Auto: {train_images} training images >= "
                        f"{LINEAR_PROBE_MAX_TRAIN_IMAGES}, enough to fine-tune")
