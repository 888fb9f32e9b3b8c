"""The report as a picture for people: training curves (loss and accuracy per epoch) and the
confusion matrix, one PNG next to the model. Drawn from report.json's own fields, so the picture
never says something the report does not.

Agg on a bare Figure (no pyplot: no global state, no display, safe in a thread), and no
timestamp or version in the PNG, so the same report gives the same bytes.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Cell values are written into the matrix only while they stay readable.
MAX_ANNOTATED_CLASSES = 15


def render_report_png(report: dict) -> bytes:
    """PNG bytes of the curves (when the run had epochs) and the confusion matrix."""
    history = [h for h in report.get("history") or [] if h.get("trainLoss") is not None]
    panels = (2 if history else 1) + 1
    figure = Figure(figsize=(5.2 * panels, 4.4), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    if history:
        _loss(axes[0], history)
        _accuracy(axes[1], history, report)
    else:
        _linear_probe_summary(axes[0], report)
    _confusion(axes[-1], report.get("confusionMatrix") or {})
    job = report.get("job") or {}
    title = " / ".join(str(part) for part in (job.get("job"), report.get("backbone"),
                                                report.get("strategy")) if part)
    if title:
        figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _epochs(history):
    return [h["epoch"] for h in history]


def _finite(values):
    return [v if v is not None and math.isfinite(v) else math.nan for v in values]


def _loss(ax, history) -> None:
    epochs = _epochs(history)
    ax.plot(epochs, _finite([h.get("trainLoss") for h in history]), "o-", label="train")
    ax.plot(epochs, _finite([h.get("valLoss") for h in history]), "s-", label="validation")
    ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()


def _accuracy(ax, history, report) -> None:
    epochs = _epochs(history)
    ax.plot(epochs, _finite([h.get("valAccuracy") for h in history]), "o-", color="C2",
            label="validation")
    baseline = (report.get("baseline") or {}).get("accuracy")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label=f"pixel baseline {baseline:.3f}")
    best = report.get("bestEpoch")
    if best in epochs:
        value = history[epochs.index(best)]["valAccuracy"]
        ax.plot([best], [value], "*", color="C3", markersize=14, label=f"best {value:.3f}")
    ax.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")


def _linear_probe_summary(ax, report) -> None:
    """No epochs to draw: the accuracies the run has, as bars."""
    bars = {"validation": report.get("valAccuracy")}
    cv = (report.get("linearProbe") or {}).get("cvAccuracy")
    if cv is not None:
        bars = {"cross-validation": cv, **bars}
    baseline = (report.get("baseline") or {}).get("accuracy")
    if baseline is not None:
        bars["pixel baseline"] = baseline
    names = [name for name, value in bars.items() if value is not None]
    values = [bars[name] for name in names]
    colours = {"cross-validation": "C0", "validation": "C2", "pixel baseline": "grey"}
    ax.bar(names, values, color=[colours[name] for name in names])
    for x, value in enumerate(values):
        ax.text(x, value + 0.02, f"{value:.3f}", ha="center")
    probe = report.get("linearProbe") or {}
    detail = f" ({probe['classifier']}, C={probe['C']})" if probe.get("classifier") else ""
    ax.set(title=f"Linear probe accuracy{detail}", ylabel="accuracy", ylim=(0, 1.1))
    ax.grid(axis="y", alpha=0.3)


def _confusion(ax, confusion: dict) -> None:
    labels = list(confusion.get("labels") or [])
    matrix = np.asarray(confusion.get("matrix") or np.zeros((0, 0)), dtype=float)
    if matrix.size == 0:
        ax.set_axis_off()
        ax.set_title("Confusion matrix: no validation images")
        return
    totals = matrix.sum(axis=1, keepdims=True)
    # Colour by the share of each true class, so small classes are as visible as big ones.
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set(title="Confusion matrix (validation)", xlabel="predicted", ylabel="true")
    if len(labels) <= MAX_ANNOTATED_CLASSES:
        for row in range(matrix.shape[0]):
            for column in range(matrix.shape[1]):
                ax.text(column, row, f"{int(matrix[row, column])}", ha="center", va="center",
                        color="white" if shares[row, column] > 0.5 else "black", fontsize=9)
