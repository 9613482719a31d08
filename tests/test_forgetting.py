"""Tests for iumad.eval.forgetting: hand-computed FM/BWT, update steps, None cells, outputs."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iumad.errors import DataError
from iumad.eval import forgetting as F

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 3 add-class steps, lower-triangular R.
TRI_STEPS = [0, 1, 2]
TRI_CLASSES = ["bagel", "cable_gland", "carrot"]
TRI_R = [[0.9, None, None], [0.8, 0.95, None], [0.85, 0.9, 0.7]]


@pytest.fixture
def tri() -> F.ForgettingReport:
    return F.forgetting_report(TRI_STEPS, TRI_CLASSES, TRI_R, "i_auroc")


def test_lower_triangular_hand_computed(tri: F.ForgettingReport) -> None:
    # f0 = max(0.9, 0.8) - 0.85 = 0.05 ; f1 = 0.95 - 0.9 = 0.05 ; class 2 learned at the last step.
    assert tri.forgetting[0] == pytest.approx(0.05)
    assert tri.forgetting[1] == pytest.approx(0.05)
    assert tri.forgetting[2] is None
    assert tri.fm == pytest.approx(0.05)
    # BWT = mean(0.85 - 0.9, 0.9 - 0.95) = -0.05
    assert tri.bwt_terms[0] == pytest.approx(-0.05)
    assert tri.bwt_terms[1] == pytest.approx(-0.05)
    assert tri.bwt_terms[2] is None
    assert tri.bwt == pytest.approx(-0.05)
    assert tri.own_row == [0, 1, 2]
    assert tri.own_step == [0, 1, 2]
    assert tri.average == pytest.approx([0.9, 0.875, (0.85 + 0.9 + 0.7) / 3])
    assert tri.final_average == pytest.approx((0.85 + 0.9 + 0.7) / 3)
    assert tri.metric == "i_auroc"
    assert set(tri.formulas) >= {"f_j", "FM", "BWT"}


def test_fm_and_bwt_differ_when_peak_is_not_own_step() -> None:
    # Class 0 peaks after its own step: f0 = 0.95 - 0.8 = 0.15, but its BWT term = 0.8 - 0.9 = -0.1.
    rep = F.forgetting_report([0, 1, 2], ["a", "b", "c"],
                              [[0.9, None, None], [0.95, 0.7, None], [0.8, 0.75, 0.6]], "i_auroc")
    assert rep.forgetting[0] == pytest.approx(0.15)
    assert rep.forgetting[1] == pytest.approx(-0.05)  # improved: negative forgetting is kept
    assert rep.fm == pytest.approx(0.05)
    assert rep.bwt == pytest.approx(((0.8 - 0.9) + (0.75 - 0.7)) / 2)


def test_update_step_reuses_column() -> None:
    # row 2 is an "update" of class a (re-measured, no new class); c arrives at row 3.
    R = [
        [0.9, None, None],
        [0.8, 0.95, None],
        [0.88, 0.93, None],
        [0.86, 0.9, 0.8],
    ]
    rep = F.forgetting_report([3, 4, 7, 9], ["a", "b", "c"], R, "i_auroc")
    assert rep.own_row == [0, 1, 3]
    assert rep.own_step == [3, 4, 9]
    assert rep.forgetting[0] == pytest.approx(0.9 - 0.86)  # max(0.9, 0.8, 0.88) - 0.86
    assert rep.forgetting[1] == pytest.approx(0.95 - 0.9)  # max(0.95, 0.93) - 0.9
    assert rep.forgetting[2] is None
    assert rep.fm == pytest.approx(0.045)
    assert rep.bwt == pytest.approx(((0.86 - 0.9) + (0.9 - 0.95)) / 2)  # -0.045
    assert rep.average == pytest.approx([0.9, 0.875, 0.905, (0.86 + 0.9 + 0.8) / 3])


def test_own_step_not_on_diagonal() -> None:
    # Column 1 is measured first (arrival order of columns need not match step order).
    rep = F.forgetting_report([0, 1], ["late", "early"], [[None, 0.9], [0.8, 0.85]], "i_auroc")
    assert rep.own_row == [1, 0]
    assert rep.forgetting == [None, pytest.approx(0.05)]
    assert rep.fm == pytest.approx(0.05)
    assert rep.bwt == pytest.approx(-0.05)


def test_none_and_nan_cells() -> None:
    R = [
        [0.9, None, None],
        [None, 0.8, None],  # a not measured at this step
        [0.85, float("nan"), 0.6],  # b undefined at the last step (NaN read as None)
    ]
    rep = F.forgetting_report([0, 1, 2], ["a", "b", "c"], R, "i_auroc")
    assert rep.R[2][1] is None
    assert rep.forgetting[0] == pytest.approx(0.05)
    assert rep.forgetting[1] is None  # no final value
    assert rep.forgetting[2] is None
    assert rep.fm == pytest.approx(0.05)
    assert rep.bwt == pytest.approx(-0.05)
    assert rep.average == pytest.approx([0.9, 0.8, 0.725])


def test_never_measured_class() -> None:
    rep = F.forgetting_report([0, 1], ["a", "b"], [[0.9, None], [0.7, None]], "p_auroc")
    assert rep.own_row == [0, None]
    assert rep.own_step == [0, None]
    assert rep.forgetting == [pytest.approx(0.2), None]
    assert rep.bwt == pytest.approx(-0.2)


def test_single_step() -> None:
    rep = F.forgetting_report([5], ["a", "b"], [[0.9, 0.8]], "i_auroc")
    assert rep.forgetting == [None, None]
    assert rep.bwt_terms == [None, None]
    assert rep.fm is None and rep.bwt is None
    assert rep.average == pytest.approx([0.85])
    assert rep.final_average == pytest.approx(0.85)
    assert rep.own_step == [5, 5]


@pytest.mark.parametrize("classes", [[], ["a", "b"]])
def test_empty_store(classes: list[str], tmp_path: Path) -> None:
    rep = F.forgetting_report([], classes, [], "i_auroc")
    assert rep.fm is None and rep.bwt is None and rep.final_average is None
    assert rep.average == [] and rep.R == []
    assert rep.forgetting == [None] * len(classes)
    d = F.to_dict(rep)
    assert json.loads(json.dumps(d))["FM"] is None
    text = F.render_text(rep)
    assert "FM (mean forgetting): -" in text and "BWT (backward transfer): -" in text
    F.write_csv(rep, tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["step", *classes]
    assert [r[0] for r in rows[1:]] == ["forgetting", "bwt_term"]
    F.plot(rep, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes().startswith(PNG_SIGNATURE)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(DataError, match="rows"):
        F.forgetting_report([0, 1], ["a"], [[0.9]], "i_auroc")
    with pytest.raises(DataError, match="classes"):
        F.forgetting_report([0], ["a", "b"], [[0.9]], "i_auroc")


def test_to_dict_json_ready(tri: F.ForgettingReport) -> None:
    d = json.loads(json.dumps(F.to_dict(tri)))
    assert d["metric"] == "i_auroc"
    assert d["R"] == [[0.9, None, None], [0.8, 0.95, None], [0.85, 0.9, 0.7]]
    assert d["FM"] == pytest.approx(0.05)
    assert d["BWT"] == pytest.approx(-0.05)
    assert d["forgetting"]["carrot"] is None
    assert d["forgetting"]["bagel"] == pytest.approx(0.05)
    assert d["own_step"] == [0, 1, 2]
    assert d["final_average"] == pytest.approx(0.8166666666666667)
    assert d["formulas"] == F.FORMULAS


def test_inputs_are_not_mutated_and_numpy_values_become_floats() -> None:
    R = [[np.float32(0.5), None], [np.float64(0.25), 0.75]]
    rep = F.forgetting_report(np.array([0, 1]), ["a", "b"], R, "i_auroc")
    assert all(type(v) is float for row in rep.R for v in row if v is not None)
    assert type(rep.fm) is float
    assert isinstance(R[0][0], np.float32)
    json.dumps(F.to_dict(rep))


def test_csv_round_trip(tri: F.ForgettingReport, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.csv"
    digest = F.write_csv(tri, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["step", "bagel", "cable_gland", "carrot"]
    assert len(rows) == 1 + 3 + 2

    def cell(s: str) -> float | None:
        return None if s == "" else float(s)

    for i, row in enumerate(rows[1:4]):
        assert int(row[0]) == TRI_STEPS[i]
        assert [cell(s) for s in row[1:]] == TRI_R[i]  # exact: repr round-trips floats
    assert rows[4][0] == "forgetting"
    assert [cell(s) for s in rows[4][1:]] == [pytest.approx(0.05), pytest.approx(0.05), None]
    assert rows[5][0] == "bwt_term"
    assert [cell(s) for s in rows[5][1:]] == [pytest.approx(-0.05), pytest.approx(-0.05), None]


@pytest.mark.parametrize("n", [3, 16])  # 16x16: above the annotation limit
def test_plot_writes_png(n: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    R = [[float(rng.uniform(0.5, 1.0)) if j <= i else None for j in range(n)] for i in range(n)]
    rep = F.forgetting_report(list(range(n)), [f"class_{j}" for j in range(n)], R, "i_auroc")
    path = tmp_path / "plots" / "forgetting.png"
    digest = F.plot(rep, path)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert digest == hashlib.sha256(data).hexdigest()
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > img.size[1] > 100  # two panels side by side
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_plot_closes_figure(tri: F.ForgettingReport, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    F.plot(tri, tmp_path / "a.png")
    assert len(plt.get_fignums()) == before


def test_render_text(tri: F.ForgettingReport) -> None:
    text = F.render_text(tri)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("step"))
    assert header.split() == ["step", "bagel", "cable_gland", "carrot", "avg"]
    row1 = next(line for line in lines if line.split() and line.split()[0] == "1")
    assert row1.split() == ["1", "80.0", "95.0", "-", "87.5"]
    forgetting = next(line for line in lines if line.startswith("forgetting"))
    assert forgetting.split() == ["forgetting", "5.0", "5.0", "-"]
    assert "FM (mean forgetting): 5.0" in lines
    assert "BWT (backward transfer): -5.0" in lines
    assert "final average: 81.7" in lines
    for formula in F.FORMULAS.values():
        assert formula in text
    # fixed width: every table line's cells start at the same column as the header's
    table = [line for line in lines[1:6]]
    col = header.index("cable_gland") + len("cable_gland")
    assert all(len(line) >= col and line[col - 1] != " " for line in table[1:])
