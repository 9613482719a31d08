"""The unified detector: shapes for any classes and modality mixes, gradient flow, determinism, save/load."""

from __future__ import annotations

import hashlib

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iumad.config import Config, from_dict
from iumad.data import find_classes, load_sample
from iumad.data.synth import generate_dataset
from iumad.errors import IumadError, UsageError
from iumad.model.detector import Detector
from iumad.model.features import SampleFeatures
from iumad.model.network import IUMADNet
from iumad.store.checkpoints import load_detector, save_detector

SIZE = 64


def tiny_config(**train) -> Config:
    cfg = Config()
    cfg.backbone.input_size = SIZE
    cfg.model.dim, cfg.model.bottleneck, cfg.model.depth, cfg.model.heads = 32, 16, 1, 2
    cfg.train.epochs, cfg.train.batch_size = 2, 4
    cfg.score.bank_size = 64
    cfg.score.sigma = 1.0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    generate_dataset(out, n_classes=3, seed=1, size=SIZE, n_train=6, n_val=2, n_test=8, workers=1)
    return out


@pytest.fixture(scope="module")
def texts() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(6, 384)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return {n: v for n, v in zip(["bolt", "disc", "ring", "cylinder", "tile", "blob"], vecs)}


def _drop(records, modality: str):
    return [dataclasses.replace(r, **{modality: None}) for r in records]


def test_fit_predict_one_and_several_classes_every_modality_mix(synth: Path, texts, tmp_path: Path) -> None:
    bolt, disc, ring = find_classes(synth)
    data = {"bolt": bolt.records("train"),  # rgb + geometry
            "disc": _drop(disc.records("train"), "geometry"),  # rgb only
            "ring": _drop(ring.records("train"), "rgb")}  # geometry only
    for n in (1, 3):
        det = Detector(tiny_config(), cache_dir=tmp_path / "cache")
        det.fit(dict(list(data.items())[:n]), texts=texts)
        assert det.class_names == list(data)[:n]
        for name, src in list(zip(data, (bolt, disc, ring)))[:n]:
            recs = src.records("test")[:3]
            if name == "disc":
                recs = _drop(recs, "geometry")
            if name == "ring":
                recs = _drop(recs, "rgb")
            for pred, rec in zip(det.predict_records(recs, name), recs):
                expected = {"fused", *det.classes[name].modalities}
                assert expected <= set(pred.maps)
                assert all(m.shape == (SIZE, SIZE) and np.isfinite(m).all() for m in pred.maps.values())
                assert pred.class_name == name and pred.class_given
                assert np.isfinite(pred.score) and pred.score == pred.branch_scores["fused"]
            auto = det.predict_records(recs)
            assert all(p.class_name in det.class_names and 0 < p.class_probability <= 1 and not p.class_given
                       for p in auto)
            if n == 3:  # auto only picks classes learned with the sample's own modalities
                assert {det.classes[p.class_name].modalities for p in auto} == {det.classes[name].modalities}
    assert det.classes["disc"].modalities == ("rgb",) and det.classes["ring"].modalities == ("geometry",)
    assert "geometry" not in det.classes["disc"].banks


def test_gradients_reach_every_trainable_part_and_never_the_backbone(texts) -> None:
    cfg = tiny_config()
    det = Detector(cfg)
    for name in ("bolt", "disc"):
        det.register_class(name, ["rgb", "geometry"], texts[name])
    net: IUMADNet = det.ensure_net()
    net.train()
    feats = {m: torch.randn(2, det.backbone.out_channels, 8, 8) for m in ("rgb", "geometry")}
    ct = det.class_texts()
    loss = torch.zeros(())
    # both modalities train the two mapping directions; each single one its masked reconstruction
    for present in (("rgb", "geometry"), ("rgb",), ("geometry",)):
        out = net({m: feats[m] for m in present}, ct[[0, 1]], ct)
        assert set(out.predicted) == ({"rgb>geometry", "geometry>rgb"} if len(present) == 2
                                      else {f"{present[0]}>{present[0]}"})
        loss = loss + sum(o.pow(2).mean() for o in out.predicted.values()) + out.logits_decoder.sum() + \
            out.logits_fused.sum() + out.logits_bottleneck.sum() + sum(s.mean() for s in out.log_scale.values())
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing
    assert all(p.grad is None and not p.requires_grad for p in det.backbone.parameters())


def test_fit_is_deterministic_and_save_load_round_trips(synth: Path, texts, tmp_path: Path) -> None:
    bolt, disc, _ = find_classes(synth)
    data = {"bolt": bolt.records("train"), "disc": disc.records("train")}
    test = disc.records("test")[:4]

    def run() -> tuple[Detector, list[float]]:
        det = Detector(tiny_config(seed=3), cache_dir=tmp_path / "cache").fit(data, texts=texts)
        return det, [p.score for p in det.predict_records(test, "disc")]

    det, scores = run()
    _, again = run()
    assert scores == again
    other = Detector(tiny_config(seed=4), cache_dir=tmp_path / "cache").fit(data, texts=texts)
    assert [p.score for p in other.predict_records(test, "disc")] != scores

    digest = save_detector(det, tmp_path / "model")
    loaded = load_detector(tmp_path / "model", expected_sha256=digest, cache_dir=tmp_path / "cache")
    assert [p.score for p in loaded.predict_records(test, "disc")] == scores
    sample = load_sample(test[0])
    assert loaded.predict(sample, "disc").score == pytest.approx(scores[0], abs=1e-5)


def test_backbone_precision_is_resolved_once_and_kept_by_a_saved_model(synth: Path, texts, tmp_path: Path,
                                                                      monkeypatch) -> None:
    """auto follows the CPU where the model is fitted; the saved model keeps it, so a CPU that resolves auto
    otherwise computes the features its memories were built from; a model saved before the setting existed
    was fitted in float32 and loads so."""
    import json

    from iumad.model import device

    bolt = find_classes(synth)[0]
    cfg = tiny_config(epochs=1)
    cfg.backbone.precision = "auto"
    monkeypatch.setattr(device, "cpu_has_bfloat16", lambda: False)
    assert Detector(cfg).spec.precision == "float32"
    monkeypatch.setattr(device, "cpu_has_bfloat16", lambda: True)
    det = Detector(cfg).fit({"bolt": bolt.records("train")}, texts=texts)
    assert det.spec.precision == "bfloat16" and det.config.backbone.precision == "auto"
    save_detector(det, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "detector.json").read_text())
    assert meta["backbone_precision"] == "bfloat16" and meta["config"]["backbone"]["precision"] == "auto"
    monkeypatch.setattr(device, "cpu_has_bfloat16", lambda: False)
    loaded = load_detector(tmp_path / "m")
    assert loaded.spec.precision == "bfloat16" and loaded.config.backbone == det.config.backbone
    del meta["backbone_precision"]
    (tmp_path / "m" / "detector.json").write_text(json.dumps(meta))
    monkeypatch.setattr(device, "cpu_has_bfloat16", lambda: True)
    assert load_detector(tmp_path / "m").spec.precision == "float32"


def test_fit_and_prediction_hand_the_freed_heap_back(synth: Path, texts, monkeypatch) -> None:
    """Training and calibration free about 0.5 GB at 288 px that glibc keeps; a prediction that followed
    stacked its own heap on top (cable_gland peaked at 2.0 GB instead of 1.6-1.8)."""
    from iumad.model import detector as detector_module

    events: list[str] = []
    monkeypatch.setattr(detector_module, "release_free_memory", lambda: events.append("trim"))
    calibrate = Detector.calibrate
    monkeypatch.setattr(Detector, "calibrate", lambda self, *a, **k: (events.append("calibrate"),
                                                                      calibrate(self, *a, **k))[1])
    bolt = find_classes(synth)[0]
    det = Detector(tiny_config(epochs=1)).fit({"bolt": bolt.records("train")}, texts=texts)
    assert "calibrate" in events and events[-1] == "trim"
    events.clear()
    extract = det.extractor.extract
    monkeypatch.setattr(det.extractor, "extract", lambda *a, **k: (events.append("extract"), extract(*a, **k))[1])
    det.predict_records(bolt.records("test")[:2], "bolt")
    assert events[0] == "trim" and "extract" in events and events[-1] == "trim"


def test_load_refuses_a_tampered_checkpoint(synth: Path, texts, tmp_path: Path) -> None:
    bolt = find_classes(synth)[0]
    det = Detector(tiny_config(epochs=1)).fit({"bolt": bolt.records("train")}, texts=texts)
    digest = save_detector(det, tmp_path / "m")
    ckpt = tmp_path / "m" / "model.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x01
    ckpt.write_bytes(bytes(data))
    with pytest.raises(IumadError, match="does not match the recorded"):
        load_detector(tmp_path / "m")
    shutil.copy(ckpt, tmp_path / "copy.pt")
    with pytest.raises(IumadError, match="does not match"):
        load_detector(tmp_path / "m", expected_sha256=digest)


def test_class_blobs_are_checked_and_format_2_checkpoints_still_load(synth: Path, texts, tmp_path: Path) -> None:
    import io
    import json

    import torch

    bolt = find_classes(synth)[0]
    det = Detector(tiny_config(epochs=1)).fit({"bolt": bolt.records("train")}, texts=texts)
    test = bolt.records("test")[:3]
    scores = [p.score for p in det.predict_records(test, "bolt")]
    save_detector(det, tmp_path / "m")
    (blob,) = (tmp_path / "m" / "classes").glob("*/*.pt")
    assert blob.stem == hashlib.sha256(blob.read_bytes()).hexdigest()
    good = blob.read_bytes()
    blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(IumadError, match="does not match the recorded"):
        load_detector(tmp_path / "m")
    # format 2 (every class inside model.pt), as stores written before the class blobs hold it
    meta = json.loads((tmp_path / "m" / "detector.json").read_text())
    c = det.classes["bolt"]
    buf = io.BytesIO()
    torch.save({"net": det.net.state_dict(), "classes": {"bolt": {"text": c.text, "banks": c.banks,
                                                                   "prototypes": c.prototypes}}}, buf)
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.pt").write_bytes(buf.getvalue())
    meta.update(format=2, sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    del meta["blobs"]
    for entry in meta["classes"]:
        del entry["blob"]
    (old / "detector.json").write_text(json.dumps(meta))
    assert [p.score for p in load_detector(old).predict_records(test, "bolt")] == scores


def test_an_unchanged_class_is_not_serialised_again(synth: Path, texts, tmp_path: Path, monkeypatch) -> None:
    from iumad.model import persistence

    bolt = find_classes(synth)[0]
    det = Detector(tiny_config(epochs=1)).fit({"bolt": bolt.records("train")}, texts=texts)
    calls = []
    real = persistence.class_bytes
    monkeypatch.setattr(persistence, "class_bytes", lambda state: calls.append(state.name) or real(state))
    save_detector(det, tmp_path / "v1", tmp_path / "blobs")
    save_detector(det, tmp_path / "v2", tmp_path / "blobs")
    assert calls == ["bolt"]  # the second version found the class's blob by the tensors it holds
    loaded = load_detector(tmp_path / "v2")
    save_detector(loaded, tmp_path / "v3", tmp_path / "blobs")
    assert calls == ["bolt"]  # a loaded class knows its blob too
    loaded.build_banks("bolt", loaded.extractor.extract(bolt.records("train")[:3]))  # a new memory
    save_detector(loaded, tmp_path / "v4", tmp_path / "blobs")
    assert calls == ["bolt", "bolt"] and len(list((tmp_path / "blobs").glob("*/*.pt"))) == 2
    assert [p.score for p in load_detector(tmp_path / "v4").predict_records(bolt.records("test")[:2], "bolt")] == \
        [p.score for p in loaded.predict_records(bolt.records("test")[:2], "bolt")]


def test_unknown_class_and_untrained_model_are_usage_errors(synth: Path, texts) -> None:
    bolt = find_classes(synth)[0]
    with pytest.raises(UsageError, match="learned no class"):
        Detector(tiny_config()).predict_records(bolt.records("test")[:1], "bolt")
    det = Detector(tiny_config(epochs=1)).fit({"bolt": bolt.records("train")}, texts=texts)
    with pytest.raises(UsageError, match="unknown class 'screw'"):
        det.predict_records(bolt.records("test")[:1], "screw")


def test_features_with_one_modality_use_only_that_branch(texts) -> None:
    det = Detector(tiny_config())
    det.register_class("bolt", ["rgb"], texts["bolt"])
    det.ensure_net().eval()
    c = det.backbone.out_channels
    rng = np.random.default_rng(0)
    items = [SampleFeatures({"rgb": rng.normal(size=(c, 8, 8)).astype(np.float16)}) for _ in range(3)]
    det.calibrate("bolt", items)
    (pred,) = det.predict_features(items[:1], ["bolt"], [(SIZE, SIZE)])
    assert set(pred.maps) == {"fused", "rgb", "reconstruction/rgb", "retrieval/rgb"}
    np.testing.assert_allclose(pred.maps["fused"], pred.maps["rgb"])


def test_memory_bank_model_scores_without_a_trained_decoder_and_picks_the_nearest_memory(synth: Path, texts) -> None:
    cfg = tiny_config(epochs=0)
    cfg.score.learned, cfg.score.class_by = False, "memory"
    bolt, disc, _ = find_classes(synth)
    det = Detector(cfg).fit({"bolt": bolt.records("train"), "disc": disc.records("train")}, texts=texts)
    preds = det.predict_records(bolt.records("test") + disc.records("test"))
    assert not any(k.split("/")[0] in ("reconstruction", "mapping") for p in preds for k in p.maps)
    truth = ["bolt"] * len(bolt.records("test")) + ["disc"] * len(disc.records("test"))
    assert np.mean([p.class_name == t for p, t in zip(preds, truth)]) > 0.9  # shapes differ a lot
    with pytest.raises(UsageError, match="nothing would score"):
        from_dict({"score": {"learned": False, "retrieval": False}})


def test_prototypes_predict_the_class_and_survive_later_classes_and_save_load(synth: Path, texts,
                                                                              tmp_path: Path) -> None:
    """The default class prediction reads frozen pooled descriptors: training a later class cannot move
    an earlier class's prototypes, and they travel in the checkpoint."""
    assert Config().score.class_by == "prototypes"
    bolt, disc, ring = find_classes(synth)
    det = Detector(tiny_config(epochs=1)).fit({"bolt": bolt.records("train"), "disc": disc.records("train")},
                                              texts=texts)
    before = {n: {m: t.clone() for m, t in c.prototypes.items()} for n, c in det.classes.items()}
    assert all(set(p) == {"rgb", "geometry"} and 0 < p["rgb"].shape[0] <= len(bolt.records("train"))
               for p in before.values())
    det.register_class("ring", ["rgb", "geometry"], texts["ring"])
    ring_train = det.extractor.extract(ring.records("train"))
    det.train([("ring", f) for f in ring_train])
    det.calibrate("ring", ring_train)
    assert all(torch.equal(det.classes[n].prototypes[m], t) for n, p in before.items() for m, t in p.items())
    test = bolt.records("test") + disc.records("test") + ring.records("test")
    truth = [r.class_name for r in test]
    preds = det.predict_records(test)
    assert np.mean([p.class_name == t for p, t in zip(preds, truth)]) > 0.9
    det.config.score.prototypes = 2  # the cap holds
    det.build_banks("ring", ring_train)
    assert det.classes["ring"].prototypes["rgb"].shape[0] == 2
    det.build_banks("ring", ring_train[:1], extend=True)  # an update keeps what was kept
    assert det.classes["ring"].prototypes["rgb"].shape[0] == 2
    save_detector(det, tmp_path / "m")
    loaded = load_detector(tmp_path / "m")
    assert all(torch.equal(loaded.classes[n].prototypes[m], t)
               for n, c in det.classes.items() for m, t in c.prototypes.items())
    # RGB-only classes, samples that also carry geometry: compared on the modality they share
    rgb_only = Detector(tiny_config(epochs=1)).fit({"bolt": _drop(bolt.records("train"), "geometry"),
                                                    "disc": _drop(disc.records("train"), "geometry")}, texts=texts)
    preds = rgb_only.predict_records(disc.records("test"))
    assert all(np.isfinite(p.class_probability) for p in preds)
    assert np.mean([p.class_name == "disc" for p in preds]) > 0.9


def test_nearest_distance_is_the_brute_force_nearest_neighbour() -> None:
    from iumad.model.retrieval import local_tokens, nearest_distance, search_matrix

    gen = torch.Generator().manual_seed(0)
    feats, bank = torch.randn(2, 8, 5, 5, generator=gen), torch.randn(300, 8, generator=gen)
    q = local_tokens(feats).permute(0, 2, 3, 1).reshape(-1, 8)
    want = torch.cdist(q.double(), bank.double()).amin(1).reshape(2, 5, 5).float()
    bank = search_matrix(bank)
    for chunk in (7, 1024):  # chunk edges change nothing
        torch.testing.assert_close(nearest_distance(feats, bank, chunk=chunk), want, rtol=1e-4, atol=1e-4)
    where = torch.rand(2, 5, 5, generator=gen) > 0.5  # a subset: the same distances there, 0 elsewhere
    torch.testing.assert_close(nearest_distance(feats, bank, chunk=7, where=where), want * where, rtol=1e-4, atol=1e-4)


def test_bfloat16_search_finds_the_nearest_token_and_measures_it_exactly() -> None:
    from iumad.model.retrieval import local_tokens, low_precision_search, nearest_distance

    gen = torch.Generator().manual_seed(1)
    feats = torch.rand(2, 40, 6, 6, generator=gen) * 4 + 2  # non-negative with a large mean, as backbone features
    bank = local_tokens(torch.rand(8, 40, 6, 6, generator=gen) * 4 + 2).permute(0, 2, 3, 1).reshape(-1, 40)
    q = local_tokens(feats).permute(0, 2, 3, 1).reshape(-1, 40)
    want = torch.cdist(q.double(), bank.double()).amin(1).reshape(2, 6, 6).float()
    search = low_precision_search(bank)
    assert search.matrix.dtype == torch.bfloat16 and search.bank.dtype == torch.float32
    got = nearest_distance(feats, search, chunk=5)
    assert (got >= want - 1e-4).all()  # a distance to a real memory token: never below the nearest
    exact = torch.isclose(got, want, rtol=1e-5, atol=1e-5)
    assert exact.float().mean() > 0.9 and torch.allclose(got, want, rtol=2e-2)  # else the second nearest
    where = torch.rand(2, 6, 6, generator=gen) > 0.5
    torch.testing.assert_close(nearest_distance(feats, search, where=where), got * where)


@pytest.mark.parametrize("columns", [1, 7, 4096, (1 << 16) + 3])
def test_bfloat16_argmin_finds_a_smallest_value_of_every_row(columns: int) -> None:
    from iumad.model.retrieval import bfloat16_argmin

    gen = torch.Generator().manual_seed(columns)
    x = (torch.randn(300, columns, generator=gen) * 50).to(torch.bfloat16)  # both signs, many equal values;
    # 300 rows: three blocks of the widening, the last short
    x[0] = 0.0  # all equal: any column; -0.0 and 0.0 are equal too
    x[1, ::2] = -0.0
    x[2, -1] = -1e30  # the last column, the smallest
    best = bfloat16_argmin(x)
    assert best.dtype == torch.long and best.shape == (300,) and ((best >= 0) & (best < columns)).all()
    torch.testing.assert_close(x.gather(1, best[:, None])[:, 0], x.amin(1), rtol=0, atol=0)
    assert best[2] == columns - 1


def test_bfloat16_scoring_keeps_the_float32_maps(synth: Path, texts, tmp_path: Path) -> None:
    bolt = find_classes(synth)[0]
    cfg = tiny_config()
    cfg.score.precision = "float32"  # not auto: that is bfloat16 already on a CPU that has it
    det = Detector(cfg, cache_dir=tmp_path / "cache")
    det.fit({"bolt": bolt.records("train")}, texts=texts)
    recs = bolt.records("test")[:4]
    exact = det.predict_records(recs, "bolt")
    det.config.score.precision = "bfloat16"
    low = det.predict_records(recs, "bolt")
    for a, b in zip(exact, low):
        for key in ("mapping/rgb", "mapping/geometry", "retrieval/rgb", "fused"):
            x, y = a.maps[key].ravel(), b.maps[key].ravel()
            assert x.dtype == y.dtype == np.float32 and np.corrcoef(x, y)[0, 1] > 0.99, key
        assert abs(a.score - b.score) < 0.05 * max(1.0, abs(a.score))


def test_search_matrices_are_cached_for_the_memories_used_last_only() -> None:
    """A step over many classes must not keep a float32 copy of every class's memory: the cache holds the
    last SEARCH_CACHE memories, a memory used again gets the same matrix, a rebuilt one a new one."""
    from iumad.model import memory
    from iumad.model.retrieval import search_matrix

    states = [memory.ClassState(f"c{i}", ("rgb",), torch.zeros(384), banks={"rgb": torch.randn(16, 4).half()})
              for i in range(memory.SEARCH_CACHE + 3)]
    first = states[0].search_matrix("rgb")
    torch.testing.assert_close(first, search_matrix(states[0].banks["rgb"]))
    assert states[0].search_matrix("rgb") is first
    for s in states[1:]:
        s.search_matrix("rgb")
    assert len(memory._searches) <= memory.SEARCH_CACHE
    assert (id(states[0].banks["rgb"]), "float32") not in memory._searches  # the least recently used went first
    assert (id(states[-1].banks["rgb"]), "float32") in memory._searches
    states[-1].banks["rgb"] = torch.randn(16, 4).half()  # a rebuilt memory: a new matrix for it
    torch.testing.assert_close(states[-1].search_matrix("rgb"), search_matrix(states[-1].banks["rgb"]))


def test_prototype_similarities_equal_the_loop_over_classes_and_follow_a_rebuilt_class() -> None:
    """One product with every class's prototypes gives what a loop over the classes gives: the nearest
    prototype per class, averaged over the modalities both have, -inf where they share none."""
    import torch.nn.functional as F

    from iumad.model.memory import ClassState, pooled_descriptors, prototype_similarities

    gen = torch.Generator().manual_seed(0)

    def protos(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, 6, generator=gen), dim=1).half()

    classes = [ClassState("a", ("rgb", "geometry"), torch.zeros(384), prototypes={"rgb": protos(3), "geometry": protos(5)}),
               ClassState("b", ("rgb",), torch.zeros(384), prototypes={"rgb": protos(1)}),
               ClassState("c", ("geometry",), torch.zeros(384), prototypes={"geometry": protos(4)})]
    feats = {"rgb": torch.randn(2, 6, 3, 3, generator=gen), "geometry": torch.randn(2, 6, 3, 3, generator=gen)}

    def loop(classes: list[ClassState], feats: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.full((2, len(classes)), float("-inf"))
        for k, c in enumerate(classes):
            sims = [(pooled_descriptors(f) @ c.prototypes[m].float().t()).amax(1) for m, f in feats.items()
                    if m in c.prototypes]
            if sims:
                out[:, k] = torch.stack(sims).mean(0)
        return out

    torch.testing.assert_close(prototype_similarities(classes, feats), loop(classes, feats))
    rgb_only = {"rgb": feats["rgb"]}
    want = loop(classes, rgb_only)
    assert torch.isinf(want[:, 2]).all()
    torch.testing.assert_close(prototype_similarities(classes, rgb_only), want)
    classes[1].prototypes["rgb"] = protos(2)  # a rebuilt class: the stacked prototypes follow it
    torch.testing.assert_close(prototype_similarities(classes, feats), loop(classes, feats))
    torch.testing.assert_close(prototype_similarities(classes[:2], feats), loop(classes[:2], feats))


@pytest.mark.parametrize("grid,size,sigma", [(28, 224, 4.0), (7, 64, 1.1428)])
def test_tokens_outside_the_reach_of_the_region_change_no_pixel_in_it(grid: int, size: int, sigma: float) -> None:
    """Skipping the retrieval search of unreached tokens is exact: any value there leaves every pixel of
    the region unchanged, and every reached token does change one (the reach is not wider than needed)."""
    from iumad.model.maps import token_maps_to_image, tokens_reaching

    gen = torch.Generator().manual_seed(0)
    region = torch.zeros(3, size, size, dtype=torch.bool)
    region[0, size // 3: size // 2, size // 4: size // 2] = True
    region[1, :3, -5:] = True  # sample 2 has no region: every token is needed
    reach = tokens_reaching(region, grid, sigma)
    assert reach[2].all() and not reach[0].all() and reach[0].any()
    tok = torch.rand(3, grid, grid, generator=gen)
    other = torch.where(reach, tok, 100 * torch.rand(3, grid, grid, generator=gen))
    maps, changed = token_maps_to_image(tok, size, sigma), token_maps_to_image(other, size, sigma)
    assert torch.equal(maps[region], changed[region])
    for b, (i, j) in [(0, ix) for ix in reach[0].nonzero().tolist()][::7]:
        bumped = tok.clone()
        bumped[b, i, j] += 1e6  # the weight at the edge of the reach is tiny, but not zero
        assert (token_maps_to_image(bumped, size, sigma)[b][region[b]] != maps[b][region[b]]).any()


@pytest.mark.parametrize("grid,size,sigma", [(28, 224, 4.0), (7, 64, 1.1428), (5, 40, 0.0)])
def test_token_maps_to_image_is_bilinear_upsampling_then_gaussian_smoothing(grid: int, size: int,
                                                                             sigma: float) -> None:
    """The two-matrix-product form equals the definition: bilinear upsampling, then a separable Gaussian
    (radius 4 sigma, reflect padding) along rows and columns."""
    from iumad.model.maps import token_maps_to_image

    tok = torch.rand(3, grid, grid, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(tok[:, None], size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        r = max(1, int(4 * sigma + 0.5))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
        k = k / k.sum()
        want = F.conv2d(F.pad(want, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        want = F.conv2d(F.pad(want, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    torch.testing.assert_close(token_maps_to_image(tok, size, sigma), want[:, 0], rtol=1e-5, atol=1e-6)


def test_local_tokens_average_the_neighbours_inside_the_grid() -> None:
    from iumad.model.retrieval import local_tokens

    for shape in [(2, 4, 6, 5), (1, 3, 1, 4), (1, 2, 2, 1)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        for x in (x, x.half()):
            want = F.avg_pool2d(x.float(), 3, stride=1, padding=1, count_include_pad=False)
            torch.testing.assert_close(local_tokens(x), want)


@pytest.mark.parametrize("bank_size", [4, 40, 4096])  # a random pool of 16 x bank_size rows; all rows; all kept
def test_memories_are_the_coreset_of_the_whole_token_pool_built_row_by_row(bank_size: int) -> None:
    """`build_memories` builds only the pool rows the coreset draws; the bank must equal `coreset` over
    the whole pool (every sample's 3x3-averaged tokens, then an update's earlier memory)."""
    from iumad.model.memory import ClassState, build_memories
    from iumad.model.retrieval import coreset, local_tokens

    rng = np.random.default_rng(0)
    first = [rng.normal(size=(6, 5, 5)).astype(np.float16) for _ in range(37)]  # 37 > BANK_CHUNK: 3 chunks
    later = [rng.normal(size=(6, 5, 5)).astype(np.float16) for _ in range(20)]
    state = ClassState("c", ("rgb",), torch.zeros(384))

    def pool(feats: list[np.ndarray]) -> torch.Tensor:
        return local_tokens(torch.from_numpy(np.stack(feats))).permute(0, 2, 3, 1).reshape(-1, 6)

    build_memories(state, {"rgb": first}, bank_size, 4, True, seed=3)
    want = coreset(pool(first), bank_size, seed=3)
    assert torch.equal(state.banks["rgb"], want.half())
    build_memories(state, {"rgb": later}, bank_size, 4, True, seed=3, extend=True)
    assert torch.equal(state.banks["rgb"], coreset(torch.cat([pool(later), want.half().float()]), bank_size,
                                                   seed=3).half())
    build_memories(state, {"rgb": []}, bank_size, 4, True, seed=3, extend=True)  # no new data: the memory's own rows
    assert len(state.banks["rgb"]) == min(bank_size, 57 * 25)


def test_predictions_keep_only_the_maps_asked_for_with_every_score(texts) -> None:
    det = Detector(tiny_config())
    det.register_class("bolt", ["rgb"], texts["bolt"])
    det.ensure_net().eval()
    rng = np.random.default_rng(0)
    items = [SampleFeatures({"rgb": rng.normal(size=(det.backbone.out_channels, 8, 8)).astype(np.float16)})
             for _ in range(3)]
    det.calibrate("bolt", items)
    full = det.predict_features(items, ["bolt"] * 3, [(SIZE, SIZE)] * 3)
    kept = det.predict_features(items, ["bolt"] * 3, [(SIZE, SIZE)] * 3, keep=("fused",))
    for a, b in zip(full, kept):
        assert set(b.maps) == {"fused"} and len(a.maps) == 4
        np.testing.assert_array_equal(a.maps["fused"], b.maps["fused"])
        assert a.branch_scores == b.branch_scores and a.score == b.score
