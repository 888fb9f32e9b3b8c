"""strategy: Auto — a budgeted race on the job's own training data and validation split.

The linear probe runs once (features computed once, cheap). The fine-tune candidates (early
stages frozen, all layers, a faster learning rate without augmentation, and FromScratch when the
probe did not beat the pixel baseline, i.e. the pretrained features do not fit the data) race by
successive halving: every candidate trains a few epochs of its own full schedule, the better half
trains further, and the last one continues to its full length from where it is, so no work is
thrown away. Then the finalist and the probe compare on validation accuracy.

The plan is sized so that the losers' epochs add at most RACE_EXTRA of the finalist's planned
training, and early stopping may end the finalist only once it has trained as many epochs as
the rest of the race cost (finalist_min_epochs), so the race costs at most 2x the finalist's own
training whatever early stopping does; the rules of thumb (small data: frozen stages before all layers; far domain: scratch,
early) set the order of the candidates, which decides ties and which candidates are left out when the budget is
too small for all of them, never the answer. This module holds the pure parts (candidates, plan,
leaderboard, reason); train.auto_race runs it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

# Losers' epochs, as a fraction of the finalist's planned epochs: with the probe, the race then
# costs about 1.5x the finalist's planned training, and the floor below keeps it under 2x when
# early stopping ends the finalist sooner.
RACE_EXTRA = 0.5
# The linear probe's cost counted in epochs of a fine-tune on the same images: one forward pass
# over the training and validation images (about a third of a training epoch) and six
# logistic-regression fits, which take under a second up to a few thousand images once the BLAS
# pools match the CPUs (cpus.py). Measured on 2 CPUs at 64 px: 0.3-0.5 epochs (docs/strategies.md).
PROBE_COST_EPOCHS = 1
# A rung ends no sooner than this many optimizer steps: after one or two epochs of a small
# dataset the ranking measures how fast a candidate starts, not where it ends (the first study
# run, with rungs of 15 and 30 steps, dropped at digits 500 the candidate that was best there).
MIN_RUNG_STEPS = 50
# The learning-rate / augmentation variant: the setting that reached 0.812 on a 1000-image
# Fashion-MNIST sample at 64 px where the defaults reached 0.680 (issue #16).
FAST_LEARNING_RATE = 0.003
FAST_BACKBONE_MULTIPLIER = 0.3
# Data up to this size is "small": the frozen-stages fine-tune comes before the all-layers one.
SMALL_DATA_IMAGES = 2000
NO_FREEZE = {"policy": "None", "batchNorm": "Frozen"}


@dataclass(frozen=True)
class Candidate:
    name: str
    strategy: str  # FineTune or FromScratch
    # Spec fields that differ from the job's: freeze and augmentation replace the job's,
    # optimizer settings are merged into its optimizer.
    overrides: dict = field(default_factory=dict)

    def spec(self, base: dict) -> dict:
        spec = copy.deepcopy(base)
        for key, value in self.overrides.items():
            spec[key] = {**spec[key], **value} if key == "optimizer" else copy.deepcopy(value)
        return spec

    def settings(self, base: dict) -> dict:
        """What the leaderboard shows of this candidate's spec."""
        spec = self.spec(base)
        return {"freeze": spec["freeze"]["policy"] if self.strategy != "FromScratch" else "None",
                "frozenStages": spec["freeze"].get("stages"),
                "learningRate": spec["optimizer"]["learningRate"],
                "backboneLrMultiplier": (spec["optimizer"]["backboneLrMultiplier"]
                                         if self.strategy != "FromScratch" else 1.0),
                "augmentation": spec["augmentation"]}


def fine_tune_candidates(*, stage_count: int, train_images: int,
                         far_from_pretraining: bool) -> list[Candidate]:
    """The deep candidates in the order the rules of thumb give them."""
    frozen_stages = max(1, stage_count * 3 // 8)  # efficientnet: stem and two block stages
    frozen = Candidate(f"FineTune first {frozen_stages} stages frozen", "FineTune", {
        "freeze": {"policy": "FirstStages", "stages": frozen_stages, "batchNorm": "Frozen"}})
    all_layers = Candidate("FineTune all layers", "FineTune", {"freeze": NO_FREEZE})
    fast = Candidate(f"FineTune all layers lr {FAST_LEARNING_RATE:g} "
                     f"x{FAST_BACKBONE_MULTIPLIER:g} no augmentation", "FineTune", {
                         "freeze": NO_FREEZE, "augmentation": "None",
                         "optimizer": {"learningRate": FAST_LEARNING_RATE,
                                       "backboneLrMultiplier": FAST_BACKBONE_MULTIPLIER}})
    scratch = Candidate("FromScratch", "FromScratch", {"freeze": NO_FREEZE})
    ordered = ([fast, frozen, all_layers] if train_images <= SMALL_DATA_IMAGES
               else [fast, all_layers, frozen])
    if far_from_pretraining:
        ordered.insert(1, scratch)
    return ordered


@dataclass(frozen=True)
class RacePlan:
    candidates: int  # how many of the ordered candidates race
    rungs: tuple[tuple[int, int], ...]  # (epochs trained by the end of the rung, survivors kept)

    def loser_epochs(self) -> int:
        alive, total = self.candidates, 0
        for epochs, kept in self.rungs:
            total += (alive - kept) * epochs
            alive = kept
        return total


def race_plan(candidate_count: int, epochs: int, *, steps_per_epoch: int = 1,
              extra: float = RACE_EXTRA) -> RacePlan:
    """Successive halving for the first `n` candidates, the largest n whose losers train at most
    `extra` x `epochs` epochs: each rung keeps the better half; with r rungs they end at
    epochs/2^(r+2), ..., epochs/8, but not before MIN_RUNG_STEPS optimizer steps where a
    quarter of `epochs` allows that, and not before one epoch; the survivor then trains to
    `epochs`."""
    shortest = max(1, min(math.ceil(MIN_RUNG_STEPS / max(1, steps_per_epoch)), epochs // 4))
    for count in range(candidate_count, 0, -1):
        alive, kept_counts = count, []
        while alive > 1:
            alive //= 2
            kept_counts.append(alive)
        rungs = tuple((max(shortest, epochs // 2 ** (len(kept_counts) + 2 - index)), kept)
                      for index, kept in enumerate(kept_counts))
        plan = RacePlan(count, rungs)
        if plan.loser_epochs() <= extra * epochs:
            return plan
    return RacePlan(1, ())


def finalist_min_epochs(loser_epochs: int, planned_epochs: int) -> int:
    """Epochs the finalist trains before early stopping may end it: as many as the rest of the
    race cost (the losers' epochs and the probe's), so that everything the race trained is at
    most twice the finalist's own training. Counted in epochs, not seconds, so the same seed
    trains the same epochs on any machine. Training past the point early stopping would have
    picked costs compute, not accuracy: the best epoch's weights are still the ones kept."""
    return min(planned_epochs, loser_epochs + PROBE_COST_EPOCHS)


def leaderboard_entry(name: str, strategy: str, *, val_accuracy: float, epochs: int, steps: int,
                      seconds: float, settings: dict | None = None, deployable: bool = True,
                      outcome: str = "") -> dict:
    return {"candidate": name, "strategy": strategy, "settings": settings or {},
            "epochs": epochs, "steps": steps, "valAccuracy": val_accuracy, "seconds": seconds,
            "deployable": deployable, "outcome": outcome}


def ranked(entries: list[dict]) -> list[dict]:
    """Best validation accuracy first; ties keep the given (rule-of-thumb) order."""
    return sorted(entries, key=lambda entry: -entry["valAccuracy"])


def race_reason(board: list[dict], *, train_images: int, val_images: int,
                cost_ratio: float) -> str:
    """Why the winner won, in one paragraph for status.strategyReason."""
    deployable = [entry for entry in board if entry["deployable"]]
    winner, others = deployable[0], deployable[1:]
    runner_up = (f"; next: {others[0]['candidate']} {others[0]['valAccuracy']:.3f}"
                 if others else "")
    reason = (f"Auto: race of {len(deployable)} candidates on this job's {train_images} training "
              f"images, ranked by accuracy on its {val_images} validation images: "
              f"{winner['candidate']} won with {winner['valAccuracy']:.3f} "
              f"({winner['epochs']} epochs){runner_up}; the race cost {cost_ratio:.2f}x the "
              "finalist's own training")
    baseline = next((entry for entry in board if entry["strategy"] == "Baseline"), None)
    if baseline is not None and baseline["valAccuracy"] > winner["valAccuracy"]:
        reason += (f". The pixel baseline ({baseline['valAccuracy']:.3f}) beat every deployable "
                   "candidate: transfer learning did not help on this data; more images or a "
                   "larger spec.model.imageSize may change that")
    return reason


def top(board: list[dict], count: int = 4) -> list[dict]:
    """The head of the leaderboard for the FineTuneJob's status."""
    return [{"candidate": entry["candidate"], "strategy": entry["strategy"],
             "valAccuracy": round(entry["valAccuracy"], 4), "epochs": entry["epochs"]}
            for entry in board[:count]]
