"""Incremental protocols (`iumad benchmark`): step sizes, the four methods, reproducibility, and that
no test-split sample is used for training, exemplar selection, calibration or thresholds.

Tiny synthetic data (3 classes, 64 px) and a tiny network; every run shares one feature cache.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from iumad.cli import app
from iumad.config import from_dict, load_config
from iumad.data.dataset import ClassSource
from iumad.errors import UsageError
from iumad.eval import protocol as protocol_module
from iumad.eval.protocol import METHODS, method_config, parse_protocol, run_protocol
from iumad.model.detector import Detector
from iumad.model.features import FeatureExtractor
from iumad.store import repository as repo
from iumad.store.db import Store
from tests.tiny import tiny_config, tiny_data

CLASSES = ["bolt", "disc", "ring"]  # alphabetical: the protocol order
METRICS = protocol_module.PROTOCOL_METRICS


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data") / "synth", seed=1, n_test=6)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("features")


# ---------------------------------------------------------------------- the test-split guard


def _split_of(record) -> str:
    """The record's split; a file under a folder called `test` counts as test whatever the record says."""
    paths = [p for p in (record.rgb, record.geometry) if p is not None]
    return "test" if record.split == "test" or any("test" in Path(p).parts for p in paths) else record.split


class TestSplitGuard:
    """Remembers the split of the record behind every `SampleFeatures` that `FeatureExtractor.extract`
    returns, and fails any training, memory-bank building, calibration or exemplar selection that is
    handed features of a test-split sample (or features it cannot trace to a record)."""

    __test__ = False  # not a pytest class

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.split: dict[int, str] = {}
        self.keep: list[Any] = []  # keeps the objects alive, so their ids are never reused
        self.seen: Counter[str] = Counter()
        guard = self
        extract = FeatureExtractor.extract

        def tracked_extract(self_, records, *args, **kwargs):
            feats = extract(self_, records, *args, **kwargs)
            for rec, f in zip(records, feats):
                guard.keep.append(f)
                guard.split[id(f)] = _split_of(rec)
            return feats

        mp.setattr(FeatureExtractor, "extract", tracked_extract)
        train, banks, stats = Detector.train, Detector.build_banks, Detector.calibrate_stats

        def guarded_train(self_, items, *args, **kwargs):
            guard.check("Detector.train", [f for _, f in items])
            return train(self_, items, *args, **kwargs)

        def guarded_banks(self_, name, items, *args, **kwargs):
            guard.check("Detector.build_banks", items)
            return banks(self_, name, items, *args, **kwargs)

        def guarded_stats(self_, name, calibration, *args, **kwargs):
            guard.check("Detector.calibrate_stats", calibration)
            return stats(self_, name, calibration, *args, **kwargs)

        from iumad.continual import step as step_module

        select = step_module.select

        def guarded_select(features, *args, **kwargs):
            guard.check("exemplars.select", features)
            return select(features, *args, **kwargs)

        mp.setattr(Detector, "train", guarded_train)
        mp.setattr(Detector, "build_banks", guarded_banks)
        mp.setattr(Detector, "calibrate_stats", guarded_stats)
        mp.setattr(step_module, "select", guarded_select)

    def check(self, where: str, feats) -> None:
        feats = list(feats)
        for f in feats:
            split = self.split.get(id(f))
            assert split is not None, f"{where}: was given features that FeatureExtractor.extract did not make"
            assert split != "test", f"{where}: was given features of a test-split sample"
        self.seen[where] += len(feats)

    def assert_exercised(self) -> None:
        for where in ("Detector.train", "Detector.build_banks", "Detector.calibrate_stats", "exemplars.select"):
            assert self.seen[where] > 0, f"{where} was never called: the guard checked nothing"


def _thresholds(store_root: Path) -> dict[str, Any]:
    from sqlalchemy.engine import URL

    url = URL.create("sqlite", database=str(store_root / "iumad.sqlite")).render_as_string()
    with Store.open(store_root, url=url, create=False) as store, store.session() as s:
        prod = repo.get_production(s)
        return {n: (t.method, t.value) for n, t in repo.thresholds_for(s, prod.id).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data: Path, config: Path, cache: Path) -> dict[str, tuple[dict, Path, dict]]:
    """Protocol 2-1 with each method, under the test-split guard: method -> (result, out, thresholds)."""
    done = {}
    for method in METHODS:
        out = tmp_path_factory.mktemp(f"run-{method}")
        with pytest.MonkeyPatch.context() as mp:
            guard = TestSplitGuard(mp)
            result = run_protocol(data, "2-1", method, "both", seed=0, out=out, config=config, cache=cache)
            guard.assert_exercised()
        done[method] = (result, out, _thresholds(out / "store"))
    return done


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("spec,n,sizes", [
    ("10-0", 10, [10]), ("9-1", 10, [9, 1]), ("6-4", 10, [6, 4]), ("6-1x4", 10, [6, 1, 1, 1, 1]),
    ("1x10", 10, [1] * 10), ("5-1x1", 6, [5, 1]), ("2-1", 3, [2, 1]), ("3x2", 6, [3, 3]),
    ("4-2x3", 10, [4, 2, 2, 2]), (" 6-2X2 ", 10, [6, 2, 2]), ("1", 1, [1]),
])
def test_parse_protocol(spec: str, n: int, sizes: list[int]) -> None:
    assert parse_protocol(spec, n) == sizes


@pytest.mark.parametrize("spec,n,needle", [
    ("9-1", 9, "there are 9 classes"), ("6-1x4", 11, "there are 11 classes"), ("1x10", 3, "3 classes"),
    ("", 3, "empty"), ("x", 3, "cannot read"), ("6-", 6, "cannot read"), ("0-3", 3, "first step"),
    ("2x0", 0, "at least 1"), ("0x2", 0, "at least 1"), ("a-b", 2, "cannot read"), ("-3", 3, "cannot read"),
    ("3.0", 3, "cannot read"),
])
def test_parse_protocol_errors_name_the_spec(spec: str, n: int, needle: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_protocol(spec, n)
    assert repr(spec) in str(exc.value) and needle in str(exc.value)


def test_method_configs_override_only_what_they_name() -> None:
    base = load_config(None).to_dict()
    frozen = json.dumps(base, sort_keys=True)
    for m in METHODS:
        cfg = method_config(m, base)
        assert cfg["continual"]["threshold_from"] == "normals"
        from_dict(cfg)  # every method's config is valid
    assert json.dumps(base, sort_keys=True) == frozen  # base untouched
    assert method_config("iumad", base)["continual"]["replay"] is True
    ft = method_config("finetune", base)
    assert ft["continual"]["replay"] is False and ft["continual"]["distill"] is False
    assert ft["score"]["retrieval"] is False and ft["score"]["class_by"] == "classifier"  # nothing protects
    mb = method_config("memory-bank", base)
    assert (mb["train"]["epochs"], mb["score"]["learned"], mb["score"]["class_by"]) == (0, False, "memory")
    assert mb["continual"]["replay"] is False and mb["continual"]["distill"] is False
    assert method_config("joint", base) == method_config("iumad", base)
    with pytest.raises(UsageError, match="--method"):
        method_config("nope", base)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_gives_r_fm_bwt_and_writes_json(runs, method: str) -> None:
    result, out, _ = runs[method]
    on_disk = json.loads((out / "protocol.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert result["classes"] == CLASSES and result["protocol_steps"] == [2, 1]
    for m in METRICS:
        assert {"final_average", "FM", "BWT"} <= set(result["summary"][m])
        assert result["reports"][m]["class_names"] == CLASSES
    R = result["reports"]["class_accuracy"]["R"]  # defined for every learned class
    if method == "joint":
        assert result["steps_run"] == [3] and len(R) == 1 and all(v is not None for v in R[0])
        assert result["summary"]["class_accuracy"]["FM"] is None
    else:
        assert result["steps_run"] == [2, 1] and len(R) == 2
        assert R[0][2] is None and all(v is not None for v in R[0][:2] + R[1])  # lower-triangular
        assert result["summary"]["class_accuracy"]["FM"] is not None
        assert result["summary"]["class_accuracy"]["BWT"] is not None
        assert [s["classes"] for s in result["steps"]] == [["bolt", "disc"], ["ring"]]
        assert (result["steps"][1]["n_replay"] > 0) == (method == "iumad")
    cfg = load_config(Path(result["config_file"]))
    assert cfg.continual.threshold_from == "normals" and cfg.train.seed == 0
    assert cfg.continual.replay == (method in ("iumad", "joint"))
    assert cfg.score.class_by == {"memory-bank": "memory", "finetune": "classifier"}.get(method, "prototypes")
    assert result["model_bytes"] > 0 and result["store_bytes"] > result["model_bytes"]
    assert result["feature_cache_shared"] and result["peak_rss_mb"] > 0
    assert all(s["seconds"] > 0 and s["n_train"] > 0 for s in result["steps"])
    for m in ("i_auroc", "aupro"):
        assert Path(result["plots"][m]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", METHODS)
def test_thresholds_come_from_normals_only(runs, method: str) -> None:
    result, _, thresholds = runs[method]
    assert set(thresholds) == set(CLASSES)
    assert {m for m, _ in thresholds.values()} == {"normal-quantile"}
    assert {n: t["method"] for n, t in result["thresholds"].items()} == {n: "normal-quantile" for n in CLASSES}


def test_same_seed_gives_the_same_r(runs, data: Path, config: Path, tmp_path: Path) -> None:
    """The acceptance point: a second run (no shared cache: features recomputed) reproduces R to 1e-6."""
    first = runs["iumad"][0]
    again = run_protocol(data, "2-1", "iumad", "both", seed=0, out=tmp_path / "again", config=config)
    for m in METRICS:
        a, b = first["reports"][m]["R"], again["reports"][m]["R"]
        assert len(a) == len(b)
        for ra, rb in zip(a, b):
            assert [x is None for x in ra] == [x is None for x in rb], m
            assert all(abs(x - y) <= 1e-6 for x, y in zip(ra, rb) if x is not None), (m, ra, rb)


def test_the_guard_fails_when_held_out_normals_come_from_the_test_split(data: Path, config: Path, cache: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The split guard can fail: with 'validation' secretly read from the test split (so the held-out
    normals that calibrate scores are test samples) the run stops at calibration."""
    records = ClassSource.records
    monkeypatch.setattr(ClassSource, "records",
                        lambda self, split: records(self, "test" if split == "validation" else split))
    TestSplitGuard(monkeypatch)
    with pytest.raises(AssertionError, match="test-split sample"):
        run_protocol(data, "1", "iumad", "both", classes=["disc"], out=tmp_path / "leak", config=config,
                     cache=cache)


def test_store_folder_is_replaced_only_if_a_benchmark_made_it(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    protocol_module._fresh_store_dir(mine)
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    (shared / "keep.npy").write_bytes(b"x")
    (mine / "features").symlink_to(shared, target_is_directory=True)
    (mine / "iumad.sqlite").write_bytes(b"old")
    protocol_module._fresh_store_dir(mine)
    assert sorted(p.name for p in mine.iterdir()) == [protocol_module.MARKER]
    assert (shared / "keep.npy").read_bytes() == b"x"  # the link was removed, not followed
    user = tmp_path / "user"
    user.mkdir()
    (user / "precious.txt").write_text("data")
    with pytest.raises(UsageError, match="not made by iumad benchmark"):
        protocol_module._fresh_store_dir(user)
    assert (user / "precious.txt").read_text() == "data"


def test_multi_class_steps_read_classes_whose_folders_are_named_otherwise(data: Path, tmp_path: Path) -> None:
    from iumad.data.dataset import find_classes

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "Bolt").symlink_to(data / "bolt", target_is_directory=True)  # folder 'Bolt' -> class 'bolt'
    (odd / "disc").symlink_to(data / "disc", target_is_directory=True)
    sources = {s.name: s for s in find_classes(odd)}
    assert protocol_module._steps_data(odd, sources, ["disc"], tmp_path / "view") == odd
    view = protocol_module._steps_data(odd, sources, ["bolt", "disc"], tmp_path / "view")
    assert view == tmp_path / "view" and sorted(s.name for s in find_classes(view)) == ["bolt", "disc"]
    assert (view / "bolt").resolve() == (data / "bolt").resolve()


def test_cli_benchmark(data: Path, config: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["benchmark", "--data", str(data), "--protocol", "1x1", "--classes", "disc",
                              "--modalities", "rgb", "--method", "finetune", "--seed", "3", "--out", str(out),
                              "--config", str(config), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["classes"] == ["disc"] and result["class_modalities"] == {"disc": ["rgb"]}
    assert result["config"]["train"]["seed"] == 3 and (out / "protocol.json").is_file()
    assert set(result["summary"]) == set(METRICS)
    for args, needle in ((["--protocol", "2-2"], "'2-2'"), (["--protocol", "2-1", "--method", "nope"], "--method"),
                         (["--protocol", "2-1", "--modalities", "depth"], "--modalities"),
                         (["--protocol", "1", "--classes", "nope"], "nope")):
        bad = tmp_path / "bad"
        res = runner.invoke(app, ["benchmark", "--data", str(data), "--out", str(bad), "--config", str(config),
                                  *args])
        assert res.exit_code == 2, res.output
        assert needle in res.stderr
        assert not bad.exists()  # refused before anything was written
    res = runner.invoke(app, ["benchmark", "--data", str(data), "--protocol", "2-2", "--out", str(tmp_path / "b")])
    assert "3 classes" in res.stderr
