"""Which strategy runs. `Auto` is resolved here, and only here, so that the rule is easy to find
and to replace. Its threshold comes from the study in docs/strategies.md (bench/strategies.py),
which measures every strategy on real data by training-set size; rerun the study (on a GPU with
`--full`) before changing it."""

from __future__ import annotations

# docs/strategies.md: at 100 and 500 training images (Fashion-MNIST and digits, 48 px, CPU-sized
# fine-tuning of about 1000 images' worth of steps) the linear probe beat FineTune with frozen
# early stages by 12-29 points, full FineTune by 24-38 and FromScratch by 38-51. No crossover was
# measured: 1000 is the first size above the measured ones, and the FineTune side of the rule
# waits for the GPU study (`bench/strategies.py --full`).
LINEAR_PROBE_MAX_TRAIN_IMAGES = 1000
EVIDENCE = "docs/strategies.md"


def choose_strategy(requested: str, *, train_images: int, weights: str) -> tuple[str, str]:
    """(strategy, reason) for spec.strategy `requested` on a dataset of `train_images`."""
    if requested != "Auto":
        return requested, "set in spec.strategy"
    if weights == "None":
        return "FromScratch", "Auto: spec.model.weights is None, so there are no pretrained features"
    if train_images < LINEAR_PROBE_MAX_TRAIN_IMAGES:
        return "LinearProbe", (f"Auto: {train_images} training images < "
                               f"{LINEAR_PROBE_MAX_TRAIN_IMAGES}; up to 500 a linear probe on "
                               f"frozen features beat every fine-tuning strategy ({EVIDENCE})")
    return "FineTune", (f"Auto: {train_images} training images >= "
                        f"{LINEAR_PROBE_MAX_TRAIN_IMAGES}, enough to fine-tune (sizes not yet "
                        f"measured for fine-tuning in {EVIDENCE})")
