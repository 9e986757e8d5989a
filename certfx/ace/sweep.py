"""The threshold sweep of an ACE model (paper 000, Sec. 4.2 and Figure 2): accuracies for many
thresholds from one set of :class:`~certfx.ace.certify.AceRecords`, as CSV and as a plot.

Thresholds default to the quantiles of the clean selection scores, so the sweep runs from "the
certification network answers everything" to "the core network answers everything".

Example:
    >>> import torch
    >>> from certfx.ace.certify import AceRecords
    >>> t, f = torch.tensor([True, False]), torch.tensor([False, False])
    >>> rec = AceRecords("selnet", 0.1, "box", torch.tensor([1.0, -1.0]), torch.tensor([0.5, -2.0]),
    ...                  torch.tensor([2.0, 0.0]), t, ~f, t, ~f, t, f)
    >>> [(r.threshold, r.natural, r.certified) for r in sweep(rec, [-3.0, 0.0, 3.0])]
    [(-3.0, 0.5, 0.5), (0.0, 1.0, 0.5), (3.0, 1.0, 0.0)]
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import torch

from certfx.ace.certify import AceAccuracy, AceRecords
from certfx.errors import InvalidValueError

__all__ = ["default_thresholds", "sweep", "write_csv", "plot"]


def default_thresholds(records: AceRecords, count: int = 21) -> list[float]:
    """``count`` thresholds spanning the clean scores (in the user's convention: entropies for
    entropy selection), plus one beyond each end."""
    if count < 2:
        raise InvalidValueError(f"need at least 2 thresholds, got {count}")
    values = -records.score if records.select == "entropy" else records.score
    q = torch.quantile(values.double(), torch.linspace(0, 1, count - 2, dtype=torch.float64))
    span = float(values.max() - values.min()) or 1.0
    ends = [float(values.min()) - 0.01 * span, float(values.max()) + 0.01 * span]
    return sorted({round(float(v), 6) for v in q.tolist()} | {round(e, 6) for e in ends})


def sweep(records: AceRecords, thresholds: Sequence[float]) -> list[AceAccuracy]:
    """The composed model's accuracies at each threshold (no re-certification)."""
    return [records.at(float(t)) for t in thresholds]


def write_csv(rows: Sequence[AceAccuracy], path: str | os.PathLike[str]) -> None:
    """One line per threshold: threshold, natural, adversarial, certified, selected,
    selection_certified."""
    fields = list(rows[0].to_json()) if rows else list(AceAccuracy.__dataclass_fields__)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r.to_json())
    os.replace(tmp, path)  # never a half-written file


def plot(curves: dict[str, Sequence[AceAccuracy]], points: dict[str, dict[str, float]],
         path: str | os.PathLike[str], title: str = "") -> None:
    """Natural (x) against certified (y) accuracy, as in the paper's Figure 2: one line per
    ACE model over its thresholds, one marker per single network (``points``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib is a dependency
        raise InvalidValueError("plotting needs matplotlib: pip install matplotlib") from err
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, rows in curves.items():
        ax.plot([100 * r.natural for r in rows], [100 * r.certified for r in rows], "s-",
                markersize=3, label=name)
    for name, acc in points.items():
        ax.plot(100 * acc["natural"], 100 * acc["certified"], "^", markersize=8, label=name)
    ax.set_xlabel("natural accuracy [%]")
    ax.set_ylabel("certified accuracy [%]")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
