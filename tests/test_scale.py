"""Issue #17's scale benchmark: the many-class generator (look-alike family), the acceptance checks the
script records, its README table, and (slow) a two-class run of the script end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from iumad.data.synth import LOOKALIKE, ClassLook, generate_dataset, many_classes, render, sample_seed
from iumad.errors import UsageError
from iumad.store.repository import validate_class_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_scale  # noqa: E402
import make_results  # noqa: E402
import probe_class_prediction  # noqa: E402


def test_many_classes_are_distinct_valid_seeded_and_hold_the_family_early() -> None:
    looks = many_classes(100)
    names = [lk.name for lk in looks]
    assert len(set(names)) == 100 and all(validate_class_name(n) for n in names)
    assert {lk.name for lk in looks[:12] if lk.family} == {name for name, _, _ in LOOKALIKE}
    assert many_classes(100) == looks and many_classes(30) == looks[:30]  # a prefix: runs of any length agree
    assert many_classes(100, seed=1)[12:] != looks[12:]
    with pytest.raises(UsageError):
        many_classes(0)


def test_a_look_changes_colour_and_size_but_not_the_pose() -> None:
    seed = sample_seed(0, "x", "train", 0)
    plain = render("x", seed, 96, look=ClassLook("x", "bolt"))
    red = render("x", seed, 96, look=ClassLook("x", "bolt", tint=(1.2, 0.4, 0.4)))
    big = render("x", seed, 96, look=ClassLook("x", "bolt", size=1.15))
    part = plain.footprint
    assert np.array_equal(red.footprint, part) and np.array_equal(red.xyz, plain.xyz)  # same shape, same pose
    rgb, rgb_red = plain.rgb[part].astype(float), red.rgb[part].astype(float)
    assert (rgb_red[:, 0] - rgb_red[:, 2]).mean() > (rgb[:, 0] - rgb[:, 2]).mean() + 20  # redder
    assert big.footprint.sum() > 1.2 * part.sum()  # 1.15 x the side: about 1.3 x the area
    # the default look is the shape itself, byte for byte
    assert np.array_equal(render("bolt", seed, 96).rgb, render("bolt", seed, 96, look=ClassLook("bolt", "bolt")).rgb)


def test_generate_dataset_writes_the_looks_and_records_them(tmp_path: Path) -> None:
    looks = many_classes(3)
    manifest = generate_dataset(tmp_path / "d", size=48, n_train=2, n_val=1, n_test=2, looks=looks, workers=1)
    assert manifest["classes"] == [lk.name for lk in looks]
    assert manifest["looks"]["bolt-red"]["tint"] == list(dict((n, t) for n, t, _ in LOOKALIKE)["bolt-red"])
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if p.is_dir()) == sorted(manifest["classes"])
    with pytest.raises(UsageError, match="once"):
        generate_dataset(tmp_path / "e", size=48, looks=[looks[0], looks[0]])


def _step(k: int, seconds: float, latency: float, store: int = 100, cache: int = 10) -> dict:
    return {"K": k, "step_seconds": seconds, "latency_auto_ms": latency, "latency_given_ms": latency,
            "store_bytes": store, "networks_bytes": 60, "class_blob_bytes": 40, "versions_on_disk": 3,
            "cache_bytes": cache, "cache_entries": k, "cache_evicted": k > 50, "peak_rss_mb": 900.0,
            "class_accuracy": 1.0, "class_accuracy_lookalike": 1.0, "fm_i_auroc": 0.01}


def test_acceptance_passes_fails_and_says_what_was_not_reached() -> None:
    flat = [_step(k, 10.0, 5.0) for k in range(1, 101)]
    checks = {c["criterion"]: c["result"] for c in bench_scale.acceptance(flat, 50, True, "ok")}
    assert set(checks.values()) == {"PASS"} and len(checks) == 6
    growing = [_step(k, 10.0 + k, 5.0 + k, store=200 if k == 100 else 100, cache=60 if k == 70 else 10)
               for k in range(1, 101)]
    checks = {c["criterion"]: c["result"] for c in bench_scale.acceptance(growing, 50, False, "lost")}
    assert checks["store bytes at K=10 <= networks + class artifacts + 10 %"] == "PASS"
    assert checks["store bytes at K=100 <= networks + class artifacts + 10 %"] == "FAIL"
    assert checks["step time at K=100 <= 2.0x at K=10"] == "FAIL"  # 110 s vs 20 s
    assert checks["auto predict latency at K=100 <= 1.5x at K=10"] == "FAIL"
    assert checks["feature cache under its limit at every step"] == "FAIL"
    assert checks["no exemplar lost to eviction"] == "FAIL"
    short = {c["criterion"]: c["result"] for c in bench_scale.acceptance(flat[:12], 50, True, "ok")}
    assert short["step time at K=100 <= 2.0x at K=10"] == "not reached"


def test_the_readme_table_has_a_row_per_decade_and_the_checks(tmp_path: Path) -> None:
    steps = [_step(k, 10.0, 5.0) for k in range(1, 13)]
    doc = {"benchmark": "scale", "quick": True, "note": "QUICK RUN", "command": "python benchmarks/bench_scale.py",
           "commit": "abc", "config_hash": "h", "config": {"continual": {"evaluation_budget": 4}}, "gc_keep": 3,
           "data": {"classes": 12, "size": 224, "train": 10, "val": 4, "test": 8}, "steps": steps,
           "acceptance": bench_scale.acceptance(steps, 50, True, "ok"),
           "marks": {"10": {"class_accuracy": 0.9, "i_auroc_abs_diff": {"recorded": {"max": 0.1, "mean": 0.05}}}}}
    text = make_results.scale(doc)
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "K |" not in line]
    assert rows == ["1", "10", "12"] and "QUICK RUN" in text and "not reached" in text
    (tmp_path / "scale.json").write_text(json.dumps(doc))
    assert "Cost of a step" in make_results.build(tmp_path)


@pytest.mark.slow
def test_the_script_runs_two_classes_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    rc = bench_scale.main(["--classes", "2", "--train", "3", "--val", "2", "--test", "4", "--epochs", "1",
                           "--evaluation-budget", "2", "--work", str(tmp_path / "w"), "--out", str(out), "--quick"])
    doc = json.loads(out.read_text())
    assert rc in (0, 1) and doc["quick"] and [s["K"] for s in doc["steps"]] == [1, 2]
    assert doc["config_hash"] and doc["commit"] and doc["machine"]["cpus"]
    assert (tmp_path / "scale.png").stat().st_size > 0
    assert {c["criterion"] for c in doc["acceptance"]} >= {"no exemplar lost to eviction"}
    assert all(s["n_evaluated"] > 0 and s["store_bytes"] > 0 for s in doc["steps"])
    assert doc["marks"]["1"]["n_samples"] == 4 and doc["marks"]["2"]["n_samples"] == 8
    # the class-prediction probe reads the store the run left
    probe = tmp_path / "class_prediction.json"
    assert probe_class_prediction.main(["--work", str(tmp_path / "w"), "--out", str(probe)]) == 0
    rows = json.loads(probe.read_text())["rows"]
    assert len(rows) == 7 and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert rows[0]["accuracy"] == doc["marks"]["2"]["class_accuracy"]  # the shipped way is what the model does
    assert "accuracy" in make_results.class_prediction(json.loads(probe.read_text()))


def test_the_linear_fit_recovers_the_fixed_part_and_the_per_class_part() -> None:
    steps = [{"K": k, "step_seconds": 30.0 + 0.5 * k} for k in range(1, 13)]
    fit = bench_scale.linear_fit(steps)
    assert fit["a"] == pytest.approx(30.0) and fit["c_per_class"] == pytest.approx(0.5)
    assert fit["predicted_ratio_100_over_10"] == pytest.approx(80 / 35, abs=1e-3)
    assert bench_scale.linear_fit(steps[:3]) is None  # two points past K=1 are not a fit
