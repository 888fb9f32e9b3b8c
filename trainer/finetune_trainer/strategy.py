"""Which strategy runs. `Auto` is resolved here, and only here, so that the rule is easy to find
and to replace. Its threshold comes from the study in docs/strategies.md (bench/strategies.py),
which measures every strategy on real data by training-set size: `derive_linear_probe_max` there
computes it from docs/strategies.json, and tests/trainer/test_strategy_choice.py fails when the
constant below and the study disagree. Rerun the study (on a GPU with `--full`) to move it."""

from __future__ import annotations

# docs/strategies.md (Fashion-MNIST at 100-10000 training images, digits at 100-1190, 48 px,
# CPU-sized fine-tunes): the linear probe was the best deployable strategy at every size measured,
# up to this one; its lead over the best fine-tune shrank from 12 points at 2000 images to 4.5 at
# 10000. Larger sets were not measured.
LINEAR_PROBE_MAX_TRAIN_IMAGES = 10000
EVIDENCE = "docs/strategies.md"


def choose_strategy(requested: str, *, train_images: int, weights: str) -> tuple[str, str]:
    """(strategy, reason) for spec.strategy `requested` on a dataset of `train_images`."""
    if requested != "Auto":
        return requested, "set in spec.strategy"
    if weights == "None":
        return "FromScratch", "Auto: spec.model.weights is None, so there are no pretrained features"
    if train_images <= LINEAR_PROBE_MAX_TRAIN_IMAGES:
        return "LinearProbe", (f"Auto: {train_images} training images <= "
                               f"{LINEAR_PROBE_MAX_TRAIN_IMAGES}; at every size measured up to "
                               f"{LINEAR_PROBE_MAX_TRAIN_IMAGES} a linear probe on frozen "
                               f"features beat every fine-tuning strategy ({EVIDENCE})")
    return "FineTune", (f"Auto: {train_images} training images > "
                        f"{LINEAR_PROBE_MAX_TRAIN_IMAGES}, more than the study measured; "
                        f"FineTune, as the probe's lead over it shrank with size ({EVIDENCE})")
