"""Forgetting measures over the step x class metric matrix R, their report, CSV, plot and text table.

R comes from ``iumad.store.repository.r_matrix``: rows are the succeeded incremental steps in
order, columns the classes in arrival order, ``R[i][j]`` the metric (e.g. I-AUROC in [0, 1]) of
class j after step i, ``None`` where it was not measured (`not_measured` says why where it is known:
image-level labels cannot measure P-AUROC). Steps may be "add-class" or "update", so row i did not
necessarily introduce class i: the *own step* of class j is the first row whose value
for j is not ``None``. Non-finite values (NaN, inf) are read as ``None`` (undefined metric).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from iumad.errors import DataError

Cell = float | None

FORMULAS: dict[str, str] = {
    "own": "own(j) = first row i with R[i][j] measured (the step that learned class j)",
    "f_j": "f_j = max_{l < T} R[l][j] - R[T][j], T = last row; defined only if own(j) < T and R[T][j] measured",
    "FM": "FM = mean of the defined f_j (higher = more forgetting)",
    "BWT": "BWT = mean over j with own(j) < T of R[T][j] - R[own(j)][j] (negative = forgetting)",
    "A_i": "A_i = mean of the measured R[i][j] (classes learned by step i)",
    "final_average": "final average = A_T",
}


@dataclass(frozen=True)
class ForgettingReport:
    """Everything the CLI prints or stores about forgetting for one metric; JSON-ready via `to_dict`."""

    metric: str
    step_indices: list[int]
    class_names: list[str]
    R: list[list[Cell]]
    own_row: list[int | None]  # row of R where class j was first measured (None: never measured)
    own_step: list[int | None]  # the step index of that row
    forgetting: list[Cell]  # f_j per class; None for classes learned at the last step or never measured
    bwt_terms: list[Cell]  # R[T][j] - R[own(j)][j] per class; None where undefined
    fm: Cell
    bwt: Cell
    average: list[Cell]  # A_i per row
    final_average: Cell
    formulas: dict[str, str] = field(default_factory=lambda: dict(FORMULAS))
    not_measured: list[list[str | None]] = field(default_factory=list)  # like R: why a None cell is empty


def with_not_measured(report: ForgettingReport, reasons: Sequence[Sequence[str | None]]) -> ForgettingReport:
    """`report` with the reasons (a matrix like R) why cells were not measured; a reason only marks a
    cell that holds no value."""
    if len(reasons) != len(report.R) or any(len(a) != len(b) for a, b in zip(reasons, report.R)):
        raise DataError(f"not-measured reasons of shape {len(reasons)} rows do not match R "
                        f"({len(report.R)} x {len(report.class_names)}); rebuild them with r_matrix")
    cells = [[why if value is None else None for why, value in zip(rrow, row)] for rrow, row in zip(reasons, report.R)]
    return dataclasses.replace(report, not_measured=cells)


def _clean(value: Any) -> Cell:
    """None for missing or non-finite values, else a plain Python float."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _mean(values: Sequence[Cell]) -> Cell:
    defined = [v for v in values if v is not None]
    return float(sum(defined) / len(defined)) if defined else None


def forgetting_report(step_indices: Sequence[int], class_names: Sequence[str],
                      R: Sequence[Sequence[Any]], metric: str) -> ForgettingReport:
    """Compute Chaudhry forgetting (f_j, FM), backward transfer (BWT) and per-step averages from R.

    Why per-class own steps: update steps re-measure existing classes, so the diagonal of R is not
    where classes were learned. Raises DataError when the shape of R does not match the labels.
    """
    steps = [int(s) for s in step_indices]
    names = [str(c) for c in class_names]
    if len(R) != len(steps):
        raise DataError(f"R has {len(R)} rows but there are {len(steps)} steps; rebuild it with r_matrix")
    matrix: list[list[Cell]] = []
    for i, row in enumerate(R):
        if len(row) != len(names):
            raise DataError(f"R row {i} has {len(row)} values but there are {len(names)} classes")
        matrix.append([_clean(v) for v in row])

    n_rows, n_cols = len(matrix), len(names)
    last = n_rows - 1
    own_row: list[int | None] = []
    for j in range(n_cols):
        own_row.append(next((i for i in range(n_rows) if matrix[i][j] is not None), None))
    own_step = [steps[r] if r is not None else None for r in own_row]

    forgetting: list[Cell] = []
    bwt_terms: list[Cell] = []
    for j in range(n_cols):
        own = own_row[j]
        final = matrix[last][j] if n_rows else None
        if own is None or own >= last or final is None:
            forgetting.append(None)
            bwt_terms.append(None)
            continue
        earlier = [matrix[l][j] for l in range(last) if matrix[l][j] is not None]
        forgetting.append(max(earlier) - final)
        bwt_terms.append(final - matrix[own][j])  # type: ignore[operator]

    average = [_mean(row) for row in matrix]
    return ForgettingReport(
        metric=metric, step_indices=steps, class_names=names, R=matrix,
        own_row=own_row, own_step=own_step, forgetting=forgetting, bwt_terms=bwt_terms,
        fm=_mean(forgetting), bwt=_mean(bwt_terms), average=average,
        final_average=average[-1] if average else None,
    )


def to_dict(report: ForgettingReport) -> dict[str, Any]:
    """JSON-ready dict (None -> null, floats unchanged), for `--json` output and the store."""
    return {
        "metric": report.metric,
        "step_indices": list(report.step_indices),
        "class_names": list(report.class_names),
        "R": [list(row) for row in report.R],
        "own_row": list(report.own_row),
        "own_step": list(report.own_step),
        "forgetting": dict(zip(report.class_names, report.forgetting)),
        "bwt_terms": dict(zip(report.class_names, report.bwt_terms)),
        "FM": report.fm,
        "BWT": report.bwt,
        "average": list(report.average),
        "final_average": report.final_average,
        "formulas": dict(report.formulas),
        "not_measured": [list(row) for row in report.not_measured] or [[None] * len(r) for r in report.R],
    }


def _cell_text(value: Cell) -> str:
    return "" if value is None else repr(value)


def write_csv(report: ForgettingReport, path: Path) -> str:
    """Write R as CSV so it opens in a spreadsheet; returns the file's sha256 (atomic write).

    Layout: header ``step,<class1>,<class2>,...``; one row per step ``<step index>,<R[i][j]...>``;
    then ``forgetting,<f_j...>`` and ``bwt_term,<R[T][j]-R[own(j)][j]...>``. Empty cell = None;
    numbers are written with ``repr`` so they read back exactly.
    """
    from iumad.store.atomic import atomic_write_bytes

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", *report.class_names])
    for step, row in zip(report.step_indices, report.R):
        writer.writerow([str(step), *(_cell_text(v) for v in row)])
    writer.writerow(["forgetting", *(_cell_text(v) for v in report.forgetting)])
    writer.writerow(["bwt_term", *(_cell_text(v) for v in report.bwt_terms)])
    return atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))


def plot(report: ForgettingReport, path: Path) -> str:
    """PNG with R as a heat map (blank = not measured) and per-class metric curves; returns sha256.

    Rendered to memory first and written atomically, so a crash never leaves half a PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iumad.store.atomic import atomic_write_bytes

    n_rows, n_cols = len(report.R), len(report.class_names)
    data = np.full((n_rows, n_cols), np.nan)
    for i, row in enumerate(report.R):
        for j, v in enumerate(row):
            if v is not None:
                data[i, j] = v

    fig, (ax_map, ax_curve) = plt.subplots(1, 2, figsize=(12, 5))
    try:
        if n_rows and n_cols:
            cmap = plt.get_cmap("viridis").with_extremes(bad="white")
            image = ax_map.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto",
                                  interpolation="nearest")
            fig.colorbar(image, ax=ax_map, label=report.metric)
            ax_map.set_xticks(range(n_cols), report.class_names, rotation=45, ha="right")
            ax_map.set_yticks(range(n_rows), [str(s) for s in report.step_indices])
            if n_rows <= 15 and n_cols <= 15:
                for i in range(n_rows):
                    for j in range(n_cols):
                        if not np.isnan(data[i, j]):
                            ax_map.text(j, i, f"{data[i, j]:.3f}", ha="center", va="center",
                                        fontsize=8, color="white" if data[i, j] < np.nanmean(data) else "black")
            for j, name in enumerate(report.class_names):
                ax_curve.plot(report.step_indices, data[:, j], marker="o", label=name)
            if n_cols <= 20:
                ax_curve.legend(fontsize=7)
        else:
            for ax in (ax_map, ax_curve):
                ax.text(0.5, 0.5, "no steps", ha="center", va="center", transform=ax.transAxes)
        ax_map.set_title(f"R matrix ({report.metric})")
        ax_map.set_xlabel("class")
        ax_map.set_ylabel("step")
        ax_curve.set_title(f"{report.metric} per class over steps")
        ax_curve.set_xlabel("step")
        ax_curve.set_ylabel(report.metric)
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)
    return atomic_write_bytes(Path(path), out.getvalue())


NOT_MEASURED_CELL = "n/m"


def _pct(value: Cell, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.1f}" if signed else f"{value * 100:.1f}"


def render_text(report: ForgettingReport) -> str:
    """Fixed-width plain-text table for the CLI: R in percent, forgetting row, FM, BWT, formulas."""
    label_w = max([len("forgetting"), *(len(str(s)) for s in report.step_indices)])
    col_w = [max(6, len(n)) for n in report.class_names]
    avg_w = 6

    def line(label: str, cells: Sequence[str], tail: str = "") -> str:
        parts = [label.ljust(label_w)] + [c.rjust(w) for c, w in zip(cells, col_w)]
        return "  ".join(parts + [tail.rjust(avg_w)]).rstrip()

    why = report.not_measured or [[None] * len(row) for row in report.R]
    out = [f"{report.metric} (%) after each step; rows = steps, columns = classes in arrival order"]
    out.append(line("step", list(report.class_names), "avg"))
    for step, row, avg, reasons in zip(report.step_indices, report.R, report.average, why):
        out.append(line(str(step), [NOT_MEASURED_CELL if r else _pct(v) for v, r in zip(row, reasons)], _pct(avg)))
    out.append(line("forgetting", [_pct(v) for v in report.forgetting]))
    notes = sorted({r for row in why for r in row if r})
    out.extend(f"{NOT_MEASURED_CELL}: {r}" for r in notes)
    out.append("")
    out.append(f"FM (mean forgetting): {_pct(report.fm)}")
    out.append(f"BWT (backward transfer): {_pct(report.bwt, signed=True)}")
    out.append(f"final average: {_pct(report.final_average)}")
    out.append("")
    out.append("formulas:")
    out.extend(f"  {key}: {text}" for key, text in report.formulas.items())
    return "\n".join(out) + "\n"
