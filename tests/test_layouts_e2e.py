"""Issue #19 acceptance, end to end and kept small (32 px fixtures, the tiny config: seconds a step):
classes of the MVTec AD, MVTec LOCO, VisA and MVTec AD 2 layouts are learned and evaluated with every R
metric; a class with image-level labels only learns and reports I-AUROC with the pixel metrics marked
not measured in R, the report and --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from iumad.cli import app
from iumad.store import repository as repo
from iumad.store.db import Store
from tests.layouts import described_folders, loco_class, mvtec_ad2_class, mvtec_ad_class, visa_dataset
from tests.tiny import tiny_config


def cli(*args: str) -> dict | list:
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def is_metric(v: object) -> bool:
    return isinstance(v, float) and 0.0 <= v <= 1.0


@pytest.mark.slow
def test_each_mvtec_family_layout_learns_and_evaluates_every_metric(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "tiny.yaml")
    store = str(tmp_path / "store")
    data = {"bottle": mvtec_ad_class(tmp_path / "ad", "bottle", gray=True),  # grey, as MVTec AD's grid
            "juice_bottle": loco_class(tmp_path / "loco", "juice_bottle"),
            "candle": visa_dataset(tmp_path / "visa", ("candle",)) / "candle",
            "vial": mvtec_ad2_class(tmp_path / "ad2", "vial")}
    for name, folder in data.items():
        summary = cli("add-class", name, "--data", str(folder), "--config", str(cfg), "--store", store)
        own = next(r for r in summary["results"] if r["class"] == name)
        assert all(is_metric(own[k]) for k in ("i_auroc", "p_auroc", "aupro")), own
        assert own["threshold_method"] == "defects" and own["not_measured"] == {}
    rows = cli("evaluate", "--store", store)
    assert [r["class"] for r in rows] == list(data)
    n = {"bottle": 6, "juice_bottle": 6, "candle": 5, "vial": 5}
    for r in rows:
        assert r["n"] == n[r["class"]] and all(is_metric(r[k]) for k in ("i_auroc", "p_auroc", "aupro")), r
    preds = cli("predict", str(data["vial"] / "test_public"), "--store", store)  # a split folder of AD 2
    assert len(preds) == 5 and {p["class"] for p in preds} <= set(data)


def test_image_level_labels_measure_i_auroc_and_mark_pixel_metrics_not_measured(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "tiny.yaml")
    store = str(tmp_path / "store")
    folders = described_folders(tmp_path / "plant", with_masks=False)  # the plant knows bad parts, no masks
    summary = cli("add-class", "hinge", "--normal", str(folders["normal"]), "--abnormal", str(folders["abnormal"]),
                  "--normal-test", str(folders["normal_test"]), "--config", str(cfg), "--store", store)
    (hinge,) = summary["results"]
    assert is_metric(hinge["i_auroc"]) and hinge["threshold_method"] == "defects"
    assert hinge["p_auroc"] is None and hinge["aupro"] is None  # never 0
    assert set(hinge["not_measured"]) == {"p_auroc", "aupro", "p_auroc_given", "aupro_given"}
    assert "not measured: image-level labels only" in hinge["warning"]
    # a second class: the step re-reads hinge's evaluation set from the stored folder description
    cli("add-class", "bottle", "--data", str(mvtec_ad_class(tmp_path / "ad", "bottle")), "--config", str(cfg),
        "--store", store)
    with Store.open(Path(store), create=False) as opened, opened.session() as s:
        _, names, p_auroc = repo.r_matrix(s, "p_auroc")
        _, _, i_auroc = repo.r_matrix(s, "i_auroc")
    assert names == ["hinge", "bottle"]
    assert [row[0] for row in p_auroc] == [None, None] and all(is_metric(row[0]) for row in i_auroc)
    assert is_metric(p_auroc[1][1])

    res = CliRunner().invoke(app, ["forgetting-report", "--metric", "p_auroc", "--store", store])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    step_rows = [ln.split() for ln in lines if ln.split()[:1] in (["0"], ["1"])]
    assert [r[1] for r in step_rows] == ["n/m", "n/m"]
    assert "n/m: not measured: image-level labels only (no pixel masks)" in lines
    report = cli("forgetting-report", "--metric", "aupro", "--store", store)
    assert report["R"][1][0] is None and report["not_measured"][1][0].startswith("not measured: image-level")
    assert report["not_measured"][1][1] is None and is_metric(report["R"][1][1])
    report = cli("forgetting-report", "--metric", "i_auroc", "--store", store)
    assert all(is_metric(v) for v in report["R"][1]) and report["not_measured"] == [[None, None], [None, None]]
    (h, b) = cli("evaluate", "--store", store)
    assert h["p_auroc"] is None and is_metric(h["i_auroc"]) and h["not_measured"]["aupro"].startswith("not measured")
    assert is_metric(b["p_auroc"]) and b["not_measured"] == {}
