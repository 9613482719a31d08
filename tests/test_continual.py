"""Learning classes one after another through the store: R, forgetting, failures, rollback, nightly.

Small synthetic data (64 px) and a tiny network keep each step to seconds; the text encoder is the real
packaged MiniLM.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner

from iumad.cli import app
from iumad.continual import step as step_module
from iumad.continual.exemplars import herding_order, replay_rows, split_holdout
from iumad.continual.nightly import nightly, robust_z
from iumad.continual.report import forgetting
from iumad.continual.step import StepRequest, learn
from iumad.continual.versions import load_production, rollback
from iumad.data.dataset import find_classes
from iumad.data.synth import generate_dataset
from iumad.errors import DataError, ForgettingLimitError, UsageError
from iumad.model.detector import Detector
from iumad.store.checkpoints import load_detector
from iumad.store import repository as repo
from iumad.store.atomic import file_sha256
from iumad.store.check import check_store
from iumad.store.db import Store
from iumad.store.models import IngestedFile
from tests.tiny import tiny_config, tiny_data

CLASSES = ["bolt", "disc", "ring"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data") / "synth", seed=1, n_train=8, n_val=6, n_test=8)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml", train={"epochs": 2},
                       continual={"exemplar_budget": 4, "holdout": 6})


@pytest.fixture(scope="module")
def learned(tmp_path_factory, data: Path, config: Path) -> tuple[Path, list[dict]]:
    """A store that learned bolt, disc and ring one after another (copy it before changing it)."""
    root = tmp_path_factory.mktemp("stores") / "three"
    with Store.open(root) as store:
        summaries = [learn(store, StepRequest(c, data, config=config)) for c in CLASSES]
    return root, summaries


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".writer.lock"))
    return dst


def scores(store: Store, records, name: str) -> np.ndarray:
    det, _ = load_production(store)
    return np.array([p.score for p in det.predict_records(records, name)])


def test_three_classes_give_a_lower_triangular_r_and_hand_computed_fm_bwt(learned) -> None:
    root, summaries = learned
    assert [s["step"] for s in summaries] == [0, 1, 2]
    assert [s["model_version"] for s in summaries] == [1, 2, 3]
    with Store.open(root) as store:
        with store.session() as s:
            steps, names, R = repo.r_matrix(s, "i_auroc")
            assert [c.name for c in repo.list_classes(s)] == CLASSES
            assert repo.get_production(s).id == 3
            assert {n: len(repo.list_exemplars(s, n)) for n in CLASSES} == {n: 4 + 6 for n in CLASSES}
        assert (steps, names) == ([0, 1, 2], CLASSES)
        for i in range(3):
            for j in range(3):
                assert (R[i][j] is None) == (j > i), (i, j, R)
        report, _ = forgetting(store, "i_auroc")
        assert check_store(store)["ok"]
    f0 = max(R[0][0], R[1][0]) - R[2][0]
    f1 = R[1][1] - R[2][1]
    assert report.forgetting == [pytest.approx(f0), pytest.approx(f1), None]
    assert report.fm == pytest.approx((f0 + f1) / 2)
    assert report.bwt == pytest.approx(((R[2][0] - R[0][0]) + (R[2][1] - R[1][1])) / 2)
    assert report.final_average == pytest.approx(sum(R[2]) / 3)


def test_versions_share_each_class_blob_and_grow_by_one_network(learned, tmp_path: Path) -> None:
    root = copy_store(learned[0], tmp_path / "s")
    with Store.open(root) as store:
        blobs = sorted(store.blobs_dir.glob("*/*.pt"))
        assert len(blobs) == len(CLASSES)  # bolt's blob written once, shared by the three versions
        folders = sorted(store.checkpoints_dir.iterdir())
        assert all(sorted(p.name for p in f.iterdir()) == ["detector.json", "model.pt"] for f in folders)
        sizes = [(f / "model.pt").stat().st_size for f in folders]
        assert max(sizes) - min(sizes) < 0.01 * min(sizes)  # the network only, whatever the class count
        referenced = store.referenced_blobs()
        assert referenced == {p.resolve() for p in blobs}
        stray = store.blobs_dir / "ab" / ("ab" + "0" * 62 + ".pt")  # a killed step's blob
        stray.parent.mkdir(exist_ok=True)
        stray.write_bytes(b"x")
        blobs[0].write_bytes(blobs[0].read_bytes() + b"!")
        assert "blob-sha256" in {p["code"] for p in check_store(store)["problems"]}
        blobs[0].unlink()
        assert "blob-missing" in {p["code"] for p in check_store(store)["problems"]}
        with store.writer_lock():
            store.remove_unfinished_checkpoints()
        assert not stray.exists()


def test_failed_step_leaves_production_and_its_predictions_unchanged(learned, data: Path, config: Path,
                                                                     tmp_path: Path, monkeypatch) -> None:
    root = copy_store(learned[0], tmp_path / "s")
    probe = find_classes(data / "disc")[0].records("test")
    with Store.open(root) as store:
        before = scores(store, probe, "disc")

        def broken_train(self, *args, **kwargs):
            raise RuntimeError("out of memory in the middle of training")

        monkeypatch.setattr(Detector, "train", broken_train)
        with pytest.raises(RuntimeError, match="out of memory"):
            learn(store, StepRequest("ring", data, config=config, update=True))
        monkeypatch.undo()
        with store.session() as s:
            last = repo.list_steps(s)[-1]
            assert (last.kind, last.status) == ("update", "failed")
            assert "out of memory" in last.error
            assert repo.get_production(s).id == 3
        assert not store.path(Store.checkpoint_dir_for(last.step_index)).exists()
        assert np.array_equal(scores(store, probe, "disc"), before)
        assert check_store(store)["ok"]
        again = learn(store, StepRequest("ring", data, config=config, update=True))  # a rerun succeeds
        assert again["kind"] == "update" and again["model_version"] == 4


def test_bad_data_changes_nothing(learned, data: Path, config: Path, tmp_path: Path) -> None:
    root = copy_store(learned[0], tmp_path / "s")
    bad = tmp_path / "bad" / "washer"
    shutil.copytree(data / "bolt", bad)
    victim = sorted((bad / "train" / "good" / "rgb").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:40])  # a truncated PNG
    with Store.open(root) as store:
        with pytest.raises(DataError, match=victim.name):
            learn(store, StepRequest("washer", bad, config=config))
        with store.session() as s:
            assert len(repo.list_steps(s)) == 3 and repo.get_class(s, "washer") is None
            assert repo.get_production(s).id == 3


def test_adding_a_class_twice_is_refused_and_update_needs_a_known_class(learned, data: Path,
                                                                       config: Path, tmp_path: Path) -> None:
    root = copy_store(learned[0], tmp_path / "s")
    runner = CliRunner()
    res = runner.invoke(app, ["add-class", "disc", "--data", str(data), "--store", str(root)])
    assert res.exit_code == 2 and "--update" in res.output
    res = runner.invoke(app, ["add-class", "washer", "--data", str(data / "bolt"), "--update",
                              "--store", str(root)])
    assert res.exit_code == 2 and "not been learned" in res.output
    res = runner.invoke(app, ["add-class", "../evil", "--data", str(data), "--store", str(root)])
    assert res.exit_code == 2 and "invalid" in res.output
    with Store.open(root) as store, store.session() as s:
        assert len(repo.list_steps(s)) == 3


def test_rollback_restores_the_previous_models_scores_exactly(learned, data: Path, tmp_path: Path) -> None:
    root = copy_store(learned[0], tmp_path / "s")
    probe = find_classes(data / "bolt")[0].records("test")
    with Store.open(root) as store:
        v2_det = load_detector(store.path("checkpoints/step-0001"))
        v2_scores = np.array([p.score for p in v2_det.predict_records(probe, "bolt")])
        result = rollback(store)
        assert (result["from_version"], result["to_version"]) == (3, 2)
        assert np.array_equal(scores(store, probe, "bolt"), v2_scores)
        with store.session() as s:
            assert repo.list_steps(s)[-1].kind == "rollback"
            assert repo.get_production(s).id == 2
        with pytest.raises(UsageError, match="already production"):
            rollback(store, to=2)
        assert check_store(store)["ok"]


def test_forgetting_limit_refuses_promotion(learned, data: Path, config: Path, tmp_path: Path,
                                            monkeypatch) -> None:
    root = copy_store(learned[0], tmp_path / "s")
    monkeypatch.setattr(step_module, "_forgetting_with", lambda *a: 0.25)  # as if FM were 25 points
    with Store.open(root) as store:
        with pytest.raises(ForgettingLimitError) as info:
            learn(store, StepRequest("ring", data, config=config, update=True, max_forgetting=3))
        assert info.value.exit_code == 6
        with store.session() as s:
            assert repo.get_production(s).id == 3
            candidate = repo.get_alias(s, "candidate")
            assert candidate is not None and store.path(candidate.checkpoint_dir).is_dir()
            assert repo.list_steps(s)[-1].status == "failed"
        assert check_store(store)["ok"]


def test_missing_exemplar_files_are_reported_and_skipped(learned, data: Path, config: Path,
                                                         tmp_path: Path) -> None:
    moved = tmp_path / "data"
    shutil.copytree(data, moved)
    root = tmp_path / "s"
    with Store.open(root) as store:
        learn(store, StepRequest("bolt", moved, config=config))
        with store.session() as s:
            first = repo.list_exemplars(s, "bolt")[0].record["files"]["rgb"]["path"]
        Path(first).unlink()
        summary = learn(store, StepRequest("disc", moved, config=config))
    assert any(Path(first).name in why and "missing" in why for why in summary["exemplars_skipped"])


def test_an_evaluation_set_that_is_gone_leaves_its_cell_empty_with_a_warning(data: Path, config: Path,
                                                                             tmp_path: Path) -> None:
    moved = tmp_path / "data"
    shutil.copytree(data, moved)
    with Store.open(tmp_path / "s") as store:
        learn(store, StepRequest("bolt", moved, config=config))
        shutil.rmtree(moved / "bolt" / "test")
        summary = learn(store, StepRequest("disc", moved, config=config))
        with store.session() as s:
            _, names, matrix = repo.r_matrix(s, "i_auroc")
    bolt = next(r for r in summary["results"] if r["class"] == "bolt")
    assert "evaluation set" in bolt["warning"] and "cannot be read" in bolt["warning"]
    assert matrix[-1][names.index("bolt")] is None and matrix[0][names.index("bolt")] is not None
    disc = next(r for r in summary["results"] if r["class"] == "disc")
    assert disc["warning"] is None or "evaluation set" not in disc["warning"]


def _outlier(src_png: Path, dst_png: Path) -> None:
    arr = np.asarray(Image.open(src_png)).copy()
    rng = np.random.default_rng(0)
    arr[:] = rng.integers(0, 256, arr.shape, dtype=np.uint8)  # nothing like the product
    Image.fromarray(arr).save(dst_png)


def test_nightly_ingests_once_quarantines_outliers_and_then_does_nothing(learned, config: Path,
                                                                       tmp_path: Path) -> None:
    root = copy_store(learned[0], tmp_path / "s")
    fresh = tmp_path / "fresh"
    # the learned data's seed, ten samples past its eight: new normals of the same products (a sample's
    # pixels depend on its seed and index only), so only the outlier stands out
    generate_dataset(fresh, n_classes=4, seed=1, size=64, n_train=18, n_val=0, n_test=2, workers=1)
    inbox = tmp_path / "inbox"
    for cls in ("bolt", "tile"):  # a known class and a new one
        for rgb in sorted((fresh / cls / "train" / "good" / "rgb").iterdir())[8:]:
            (inbox / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(rgb, inbox / cls / rgb.name)
            shutil.copy(fresh / cls / "train" / "good" / "xyz" / f"{rgb.stem}.tiff", inbox / cls / f"{rgb.stem}.tiff")
    _outlier(inbox / "bolt" / "008.png", inbox / "bolt" / "900.png")
    shutil.copy(inbox / "bolt" / "008.tiff", inbox / "bolt" / "900.tiff")
    (inbox / "Bad Name").mkdir()
    tiny_config(tmp_path / "n.yaml", train={"epochs": 2},
                continual={"exemplar_budget": 4, "holdout": 6, "quarantine_max_share": 0.3})
    with Store.open(root) as store:
        plan = nightly(store, inbox, dry_run=True)
        assert [(c["class"], c["action"], c["new_samples"]) for c in plan["classes"]] == \
            [("bolt", "update", 11), ("tile", "add-class", 10)]
        with store.session() as s:
            assert len(repo.list_steps(s)) == 3  # a dry run writes nothing
        report = nightly(store, inbox, config=tmp_path / "n.yaml")
        assert report["exit_code"] == 0 and any("Bad Name" in p for p in report["problems"])
        bolt = report["classes"][0]
        # at most 3 of 11, worst first, each past quarantine_z: the noise image among them (this 2-epoch model
        # on a few 64 px samples also puts some of its own product's new normals far out, so not alone)
        held = [Path(q["path"]).name for q in bolt["quarantined"]]
        assert "900.png" in held and len(held) <= 3 and all(q["z"] > 4.0 for q in bolt["quarantined"])
        assert [q["z"] for q in bolt["quarantined"]] == sorted((q["z"] for q in bolt["quarantined"]), reverse=True)
        assert not any((inbox / "bolt" / name).exists() for name in held)
        step = bolt["step"]["step"]
        [moved] = (root / "quarantine" / f"step-{step:04d}" / "bolt").glob("*-900.png")  # <sha256[:12]>-<name>
        assert moved.name == f"{file_sha256(moved)[:12]}-900.png"
        with store.session() as s:
            assert [c.name for c in repo.list_classes(s)] == CLASSES + ["tile"]
            assert [st.kind for st in repo.list_steps(s)][-2:] == ["update", "add-class"]
            quarantined = list(s.scalars(select(IngestedFile).where(IngestedFile.status == "quarantined")))
            # 900.tiff has 008.tiff's content, which was learned: only the PNG is recorded as refused (another
            # quarantined sample has a row per file, both named by its PNG)
            rows = Counter(Path(f.path).name for f in quarantined)
            assert rows == Counter({name: 1 if name == "900.png" else 2 for name in held})
            assert all(f.step_id for f in quarantined)
            n_steps = len(repo.list_steps(s))
        second = nightly(store, inbox, config=tmp_path / "n.yaml")
        assert second["classes"] == [] and second["message"] == "nothing new in the inbox"
        with store.session() as s:
            assert len(repo.list_steps(s)) == n_steps
        assert check_store(store)["ok"]


def test_cli_reports_json_csv_plot_and_predict_overlays(learned, data: Path, tmp_path: Path) -> None:
    root = str(learned[0])
    runner = CliRunner()
    res = runner.invoke(app, ["forgetting-report", "--store", root, "--json", "--csv", str(tmp_path / "r.csv"),
                              "--plot", str(tmp_path / "r.png")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["class_names"] == CLASSES and len(report["R"]) == 3 and "FM" in report["formulas"]
    assert (tmp_path / "r.csv").read_text().startswith("step,bolt,disc,ring")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["forgetting-report", "--store", root, "--metric", "nope"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["predict", str(data / "disc" / "test"), "--class", "disc", "--store", root,
                              "--out", str(tmp_path / "pred"), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 8 and {r["decision"] for r in rows} <= {"anomalous", "normal"}
    assert all(r["class"] == "disc" and r["threshold"] is not None for r in rows)
    assert len(list((tmp_path / "pred").glob("*_fused.png"))) == 8
    assert (tmp_path / "pred" / "predictions.csv").is_file()
    for cmd in (["classes"], ["history"], ["evaluate", "--class", "bolt"]):
        res = runner.invoke(app, [*cmd, "--store", root, "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)
    res = runner.invoke(app, ["classes", "--store", str(tmp_path / "nowhere")])
    assert res.exit_code == 2


def test_herding_tracks_the_mean_and_holdout_is_never_trained_on() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    order = herding_order(x, 10)
    assert len(set(order)) == 10
    herd = np.linalg.norm(x[order[:5]].mean(0) - x.mean(0))
    rand = np.mean([np.linalg.norm(x[rng.permutation(50)[:5]].mean(0) - x.mean(0)) for _ in range(50)])
    assert herd < rand
    train, held = split_holdout(list(range(20)), [], 3)
    assert held == [0, 5, 10] and not set(held) & set(train)
    assert split_holdout(list(range(4)), ["v1", "v2"], 1) == ([0, 1, 2, 3], ["v1"])
    z = robust_z(np.array([1.0, 2.0, 30.0]), np.array([1.0, 2.0, 3.0, 2.0, 1.0]))
    assert z[2] > 10 > abs(z[0])


def test_a_total_budget_replays_whole_layers_then_a_rotating_window_of_the_classes() -> None:
    kept = {"a": ["a0", "a1"], "b": ["b0"], "c": ["c0", "c1"]}
    assert replay_rows(kept, 5, 0) == kept  # everything fits
    assert replay_rows(kept, 4, 0) == {"a": ["a0", "a1"], "b": ["b0"], "c": ["c0"]}  # the best of each first
    one_each = {n: [f"{n}0"] for n in "abcdefg"}
    seen: set[str] = set()
    for step in range(4):  # more classes than the budget: at most 2 a step, every class in turn
        picked = [r for rows in replay_rows(one_each, 2, step).values() for r in rows]
        assert len(picked) == 2
        seen |= set(picked)
    assert seen == {f"{n}0" for n in "abcdefg"}


def test_a_step_under_a_total_budget_replays_at_most_the_budget_and_every_class_keeps_its_exemplars(
        data: Path, tmp_path: Path) -> None:
    """With more classes than the total budget, a step trains on at most `exemplar_budget` replayed samples
    (its cost does not grow with the number of classes), and no class loses its exemplars or held-out
    normals for not being replayed at this step."""
    config = tiny_config(tmp_path / "total.yaml", train={"epochs": 1},
                         continual={"exemplar_budget": 1, "exemplar_budget_mode": "total", "holdout": 2})
    with Store.open(tmp_path / "store") as store:
        summaries = [learn(store, StepRequest(c, data, config=config)) for c in CLASSES]
        with store.session() as s:
            kept = {c: [e.method for e in repo.list_exemplars(s, c)] for c in CLASSES}
    assert [x["n_replay"] for x in summaries] == [0, 1, 1]
    for c in CLASSES:
        assert kept[c].count("holdout") == 2 and len(kept[c]) == 3, (c, kept[c])


def test_incremental_commands_on_postgresql(pg_url: str, data: Path, config: Path, tmp_path: Path,
                                            monkeypatch) -> None:
    """The same CLI on PostgreSQL tables (skips without IUMAD_TEST_PG_URL; CI starts a server)."""
    monkeypatch.setenv("IUMAD_DB_URL", pg_url)
    store = ["--store", str(tmp_path / "store")]
    runner = CliRunner()
    for cls in ("bolt", "disc"):
        res = runner.invoke(app, ["add-class", cls, "--data", str(data), "--config", str(config), *store, "--json"])
        assert res.exit_code == 0, res.output
    report = json.loads(runner.invoke(app, ["forgetting-report", *store, "--json"]).stdout)
    assert report["class_names"] == ["bolt", "disc"] and report["R"][0][1] is None
    assert runner.invoke(app, ["add-class", "bolt", "--data", str(data), *store]).exit_code == 2
    res = runner.invoke(app, ["rollback", *store, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["to_version"] == 1
    res = runner.invoke(app, ["db", "check", *store, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"]
    assert "postgresql" in json.loads(res.stdout)["url"]
