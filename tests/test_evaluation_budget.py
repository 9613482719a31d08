"""`continual.evaluation_budget`: old classes are evaluated on a fixed, recorded, stratified subset of
their evaluation set; `iumad evaluate` still measures the whole set."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sqlalchemy import select

from iumad.config import from_dict
from iumad.continual.classdata import class_source
from iumad.continual.evaluation import evaluate_class
from iumad.continual.report import evaluate_production
from iumad.continual.step import StepRequest, learn
from iumad.continual.subset import choose_subset, restrict, sample_key
from iumad.continual.versions import load_version
from iumad.data.sample import SampleRecord
from iumad.errors import UsageError
from iumad.store import repository as repo
from iumad.store.db import Store
from iumad.store.models import Evaluation, ProductClass, Step
from tests.tiny import tiny_config, tiny_data

BUDGET = 4
N_TEST = 8  # 2 good + 6 defects (labels_for_test_split)


def _records(n_good: int, defects: dict[str, int], root: str = "/x") -> list[SampleRecord]:
    out = [SampleRecord("c", "test", "good", rgb=Path(f"{root}/good/{i:03d}.png")) for i in range(n_good)]
    for label, n in defects.items():
        out += [SampleRecord("c", "test", label, rgb=Path(f"{root}/{label}/{i:03d}.png")) for i in range(n)]
    return out


def test_subset_is_stratified_deterministic_and_spreads_over_defect_types() -> None:
    recs = _records(10, {"crack": 10, "dent": 10, "hole": 10})
    sub = choose_subset(recs, 8, seed=0, name="c")
    chosen, lost = restrict(recs, sub)
    assert lost == 0 and len(chosen) == 8 and sub["budget"] == 8 and sub["seed"] == 0
    labels = [r.label for r in chosen]
    assert labels.count("good") == 2  # 10 of 40 are good: a quarter of 8
    assert {"crack", "dent", "hole"} <= set(labels)  # every defect type is represented
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    assert choose_subset(shuffled, 8, seed=0, name="c") == sub  # the listing order does not matter
    assert choose_subset(recs, 8, seed=1, name="c") != sub  # the seed does
    # at least one of each kind when both exist, however skewed the set
    for n_good, n_def in ((1, 30), (30, 1)):
        recs = _records(n_good, {"cut": n_def})
        labels = [r.label for r in restrict(recs, choose_subset(recs, 4, seed=0, name="c"))[0]]
        assert len(labels) == 4 and "good" in labels and "cut" in labels
    # a set no larger than the budget is taken whole; a set of one kind stays of one kind
    recs = _records(2, {"cut": 1})
    assert len(choose_subset(recs, 5, 0, "c")["keys"]) == 3
    assert [r.label for r in restrict(_records(9, {}), choose_subset(_records(9, {}), 4, 0, "c"))[0]] == ["good"] * 4


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(UsageError, match="evaluation_budget"):
        from_dict({"continual": {"evaluation_budget": -1}})
    assert from_dict({"continual": {"evaluation_budget": None}}).continual.evaluation_budget is None


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory) -> tuple[Path, Path, Path, list[dict]]:
    """Three tiny classes learned one per step with an evaluation budget of 4 out of 8 test samples."""
    folder = tmp_path_factory.mktemp("budget")
    data = tiny_data(folder / "synth", seed=3, n_test=N_TEST)
    config = tiny_config(folder / "tiny.yaml", continual={"evaluation_budget": BUDGET})
    root = folder / "store"
    summaries = []
    with Store.open(root) as store:
        for name in ("bolt", "disc", "ring"):
            summaries.append(learn(store, StepRequest(name, data, config=config)))
    return data, config, root, summaries


def _subsets(store: Store) -> dict[str, dict]:
    with store.session() as s:
        return {n: es.subset for n, es in repo.evaluation_sets(s, "test")}


def _cells(store: Store, metric: str = "i_auroc") -> dict[tuple[int, str], int]:
    with store.session() as s:
        q = (select(Step.step_index, ProductClass.name, Evaluation.n)
             .join(Step, Step.id == Evaluation.step_id).join(ProductClass, ProductClass.id == Evaluation.class_id)
             .where(Evaluation.metric == metric))
        return {(i, n): count for i, n, count in s.execute(q)}


def test_each_class_records_its_subset_once_and_every_cell_of_r_uses_it(budgeted) -> None:
    data, _, root, summaries = budgeted
    with Store.open(root) as store:
        subsets = _subsets(store)
        assert set(subsets) == {"bolt", "disc", "ring"}
        for name, sub in subsets.items():
            records = class_source(name, data).records("test")
            assert sub == choose_subset(records, BUDGET, seed=0, name=name)  # chosen when the class arrived
            labels = [r.label for r in restrict(records, sub)[0]]
            assert len(labels) == BUDGET and "good" in labels and len(set(labels)) > 1
        # every cell of R, the new class's own included, was measured on BUDGET samples
        cells = _cells(store)
        assert cells == {(i, n): BUDGET for i, names in enumerate([["bolt"], ["bolt", "disc"],
                                                                    ["bolt", "disc", "ring"]]) for n in names}
        assert all(r["n_eval"] == BUDGET for s in summaries for r in s["results"])
        assert all(s["evaluation_budget"] == BUDGET for s in summaries)
        # the last row of R holds the metrics of the subset under the production model
        with store.session() as s:
            prod = repo.get_production(s)
            _, names, matrix = repo.r_matrix(s, "i_auroc")
        det = load_version(store, prod)
        for name in ("bolt", "disc"):
            subset_records = restrict(class_source(name, data).records("test"), subsets[name])[0]
            res = evaluate_class(det, name, subset_records, [], [], 0.99)
            assert res.n_eval == BUDGET
            assert matrix[-1][names.index(name)] == pytest.approx(res.metrics["i_auroc"], abs=1e-9)
        # `iumad evaluate` measures the whole set
        rows = evaluate_production(store)
        assert {r["class"]: r["n"] for r in rows} == {"bolt": N_TEST, "disc": N_TEST, "ring": N_TEST}


def test_the_subset_stays_the_same_at_later_steps_and_a_later_budget_chooses_one_then(budgeted, tmp_path: Path
                                                                                       ) -> None:
    data, _, _, _ = budgeted
    plain = tiny_config(tmp_path / "plain.yaml")
    budget = tiny_config(tmp_path / "budget.yaml", continual={"evaluation_budget": BUDGET})
    with Store.open(tmp_path / "store") as store:
        learn(store, StepRequest("bolt", data, config=plain))  # no budget: the whole set, no subset
        assert _subsets(store) == {"bolt": None}
        assert _cells(store) == {(0, "bolt"): N_TEST}
        learn(store, StepRequest("disc", data, config=budget))  # the budget applies from here on
        first = _subsets(store)
        assert first["bolt"] == choose_subset(class_source("bolt", data).records("test"), BUDGET, 0, "bolt")
        learn(store, StepRequest("ring", data, config=budget))
        assert {k: v for k, v in _subsets(store).items() if k != "ring"} == first  # not chosen again
        assert _cells(store)[(2, "bolt")] == BUDGET and _cells(store)[(2, "disc")] == BUDGET


def test_a_lost_subset_sample_is_reported_and_the_rest_measured(budgeted, tmp_path: Path) -> None:
    import shutil

    data, config, _, _ = budgeted
    copy = tmp_path / "synth"
    shutil.copytree(data, copy)
    with Store.open(tmp_path / "store") as store:
        learn(store, StepRequest("bolt", copy, config=config))
        sub = _subsets(store)["bolt"]
        gone = next(r for r in class_source("bolt", copy).records("test")
                    if sample_key(r) in sub["keys"] and r.label != "good")
        for p in (gone.rgb, gone.geometry, gone.gt):
            if p is not None:
                Path(p).unlink()
        summary = learn(store, StepRequest("disc", copy, config=config))
    bolt = next(r for r in summary["results"] if r["class"] == "bolt")
    assert bolt["n_eval"] == BUDGET - 1
    assert "no longer in" in bolt["warning"]


def test_calibration_returns_the_scores_predict_gives_its_normals(budgeted) -> None:
    """A step takes the held-out normals' scores from the calibration instead of scoring them again."""
    import numpy as np

    from iumad.continual.evaluation import sizes_of

    data, _, root, _ = budgeted
    with Store.open(root) as store:
        with store.session() as s:
            det = load_version(store, repo.get_production(s))
    held = class_source("disc", data).records("validation")
    feats = det.extractor.extract(held, det.classes["disc"].modalities)
    scores = det.calibrate_stats("disc", feats)
    predicted = [p.score for p in det.predict_features(feats, ["disc"] * len(feats), sizes_of(held))]
    assert np.allclose(scores, predicted, rtol=0, atol=1e-6)
