"""The unified detector: the scikit-learn-like face (fit / predict) over its parts.

- `features`: records -> frozen features (cached); `network` + `trainer`: the learned model;
- `memory`: per class, a text embedding, memories of normal data, calibration;
- `scorer` + `maps`: features -> maps -> standardised, fused, masked maps and image scores;
- `persistence`: to and from bytes (files are written atomically by the store, above this floor).

`predict_records` runs files -> maps in batches on one worker per core (`features.inter_op`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from iumad.config import Config
from iumad.data.io import read_rgb
from iumad.data.loading import record_size
from iumad.data.region import object_region
from iumad.data.sample import Sample, SampleRecord
from iumad.errors import DataError, UsageError
from iumad.heap import release_free_memory
from iumad.model import scorer
from iumad.model.backbone import BackboneSpec, FrozenBackbone
from iumad.model.device import resolve_device, scoring_precision
from iumad.model.feature_cache import FeatureCache, limit_bytes
from iumad.model.features import MODALITIES, FeatureExtractor, SampleFeatures, batches, inter_op
from iumad.model.maps import GridMaps, image_scores, upsample
from iumad.model.memory import ClassState, build_memories
from iumad.model.network import IUMADNet
from iumad.model.trainer import DistillFn, seed_everything, train_network
from iumad.progress import ProgressFn, no_progress

SCORE_BATCH = 16  # samples scored together
REGION_IMAGES = 64  # normal images an RGB-only class's object region is found from


@dataclass
class Prediction:
    """Scores and maps of one sample; maps read as (H, W) float32 at the sample's own resolution (kept at
    the model's input size until read: `maps.GridMaps`)."""

    class_name: str
    class_probability: float
    class_given: bool
    score: float
    maps: Mapping[str, np.ndarray]  # "fused", "rgb", "geometry", and "branch/modality" maps
    branch_scores: dict[str, float]  # image score of every map


class Detector:
    """One model for every class: `fit(samples_by_class)`, `predict(sample, class_name=None)`."""

    def __init__(self, config: Config | None = None, cache_dir: Path | None = None,
                 backbone_precision: str | None = None) -> None:
        """`backbone_precision`: the resolved precision of a saved model's features (default: the config's,
        resolved for the device)."""
        self.config = config or Config()
        b = self.config.backbone
        self.cache_dir = cache_dir
        self.device = resolve_device(self.config.train.device)  # backbone, network and retrieval run there
        self.spec = BackboneSpec(b.name, b.weights, tuple(b.levels), b.input_size,
                                 backbone_precision or scoring_precision(b.precision, self.device))
        self.classes: dict[str, ClassState] = {}  # in arrival order
        self._backbone: FrozenBackbone | None = None
        self._extractor: FeatureExtractor | None = None
        self.net: IUMADNet | None = None
        self._text_encoder = None  # loaded on the first class whose embedding is not given
        if self.config.train.threads:
            torch.set_num_threads(self.config.train.threads)

    # ------------------------------------------------------------------ parts

    @property
    def backbone(self) -> FrozenBackbone:
        if self._backbone is None:
            self._backbone = FrozenBackbone(self.spec).to(self.device)
        return self._backbone

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            cache = None if self.cache_dir is None else \
                FeatureCache(self.cache_dir, limit_bytes(self.config.backbone.cache_limit_gb))
            self._extractor = FeatureExtractor(self.backbone, cache)
        return self._extractor

    def ensure_net(self) -> IUMADNet:
        if self.net is None:
            seed_everything(self.config.train.seed)
            self.net = IUMADNet(self.config.model, self.backbone.out_channels).to(self.device)
        return self.net

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def class_texts(self) -> torch.Tensor:
        return torch.stack([c.text for c in self.classes.values()])

    # ------------------------------------------------------------------ fit

    def register_class(self, name: str, modalities: Sequence[str], text: np.ndarray | None = None,
                       description: str | None = None) -> ClassState:
        """Add a class (its text embedding, its modalities); adds no weights to the network."""
        if text is None:
            if self._text_encoder is None:
                from iumad.model.text import TextEncoder

                self._text_encoder = TextEncoder()
            text = self._text_encoder.class_embedding(name, description)
        mods = tuple(m for m in MODALITIES if m in modalities)
        if not mods:
            raise UsageError(f"class {name!r}: no modality among {list(modalities)}; use rgb and/or geometry")
        state = ClassState(name, mods, torch.as_tensor(np.asarray(text, dtype=np.float32)))
        self.classes[name] = state
        return state

    def fit(self, samples_by_class: Mapping[str, Sequence[SampleRecord]],
            validation: Mapping[str, Sequence[SampleRecord]] | None = None,
            texts: Mapping[str, np.ndarray] | None = None, progress: ProgressFn = no_progress) -> "Detector":
        """Train on several classes at once (the joint "10-0" setting) and calibrate each on held-out
        normals: its `validation` records, else every fifth training sample, which then is neither
        trained on nor put in the memory (maps of trained samples would understate a normal's score)."""
        feats: dict[str, list[SampleFeatures]] = {}
        for name, records in samples_by_class.items():
            if not records:
                raise DataError(f"class {name!r}: no training sample; add images to its train split")
            f = self.extractor.extract(records, stage=f"features {name}", progress=progress)
            mods = sorted({m for s in f for m in s.modalities}, key=MODALITIES.index)
            self.register_class(name, mods, None if texts is None else texts.get(name))
            feats[name] = f
        val = {name: self.extractor.extract(recs, stage=f"features {name} (validation)", progress=progress)
               for name, recs in (validation or {}).items() if recs}
        for name, f in feats.items():  # no validation split: every fifth sample is held out of training
            if name not in val and len(f) >= 2:
                val[name], feats[name] = f[::5], [s for i, s in enumerate(f) if i % 5]
        self.train([(n, s) for n, fs in feats.items() for s in fs], progress=progress)
        for name, f in feats.items():
            self.fit_region(name, samples_by_class[name])
            self.calibrate(name, f, val.get(name))
        del feats, val
        release_free_memory()  # training's and calibration's freed heap (about 0.5 GB on cable_gland at 288 px):
        return self            # kept, a prediction that follows stacked its own on top of it (`iumad.heap`)

    def train(self, items: Sequence[tuple[str, SampleFeatures]], epochs: int | None = None,
              progress: ProgressFn = no_progress, distill: DistillFn | None = None) -> list[float]:
        """Optimise the network on (class name, features) pairs; returns the mean loss of each epoch."""
        names = self.class_names
        return train_network(self.ensure_net(), [(names.index(n), s) for n, s in items], self.class_texts(),
                             self.config, epochs, progress, distill)

    def calibrate(self, name: str, train: Sequence[SampleFeatures],
                  calibration: Sequence[SampleFeatures] | None = None) -> None:
        """Build the class's memories and the statistics that standardise its maps.

        Statistics come from `calibration` normals (validation split) when given, else from every fifth
        training sample, which is then left out of the memory so its distances are honest."""
        if calibration:
            bank_items, calib = list(train), list(calibration)
        else:
            calib = list(train[::5])
            bank_items = [s for i, s in enumerate(train) if i % 5 != 0] or list(train)
        self.build_banks(name, bank_items)
        self.calibrate_stats(name, calib)

    def fit_region(self, name: str, records: Sequence[SampleRecord], extend: bool = False) -> None:
        """Where an RGB-only class's object lies (`data.region.object_region` of up to REGION_IMAGES of its
        normal images at the input size), or None; `extend` adds it to the class's current region (an
        update step; kept as it was where the new images show none). Classes with geometry, or with
        `score.object_region` off, have none."""
        state = self.classes[name]
        old = state.region if extend else None
        if not self.config.score.object_region or "geometry" in state.modalities:
            state.region = None
            return
        size = self.spec.input_size
        step = max(1, -(-len(records) // REGION_IMAGES))
        images = [read_rgb(r.rgb, size) for r in records[::step] if r.rgb is not None]
        found = object_region(images) if images else None
        if found is None:
            state.region = old
        else:
            region = torch.from_numpy(found)
            state.region = region if old is None else region | old

    def build_banks(self, name: str, items: Sequence[SampleFeatures], extend: bool = False) -> None:
        """The class's memories of its normal data (`memory.build_memories`)."""
        state = self.classes[name]
        sc = self.config.score
        present = {m: [s.features[m] for s in items if m in s.features] for m in state.modalities}
        build_memories(state, present, sc.bank_size, sc.prototypes, sc.retrieval, self.config.train.seed, extend)

    def calibrate_stats(self, name: str, calibration: Sequence[SampleFeatures]) -> np.ndarray:
        """Mean and spread of every raw map on held-out normals of the class (never trained on), and the
        maps' fusion weights; rerun for old classes after each step, since the network changed. Returns
        the normals' image scores under the new calibration (at the input size), from the same maps, so
        that a step need not score its held-out normals twice."""
        state = self.classes[name]
        calib = list(calibration)
        if not calib:
            raise DataError(f"class {name!r}: no held-out normal sample to calibrate its scores")
        size = self.spec.input_size
        chunks = [scorer.raw_maps(self.ensure_net(), self.classes, batch, [name] * len(batch), self.config, size)
                  for batch in batches(calib, SCORE_BATCH)]
        raw = {key: torch.cat([c[0][key] for c in chunks]) for key in chunks[0][0]}
        regions = [c[1] for c in chunks]
        inside = None if any(r is None for r in regions) else torch.cat(regions)
        state.stats = {}
        for key, maps in raw.items():
            values = maps[inside] if inside is not None and inside.any() else maps.flatten()
            state.stats[key] = (float(values.mean()), float(values.std().clamp_min(1e-6)))
        state.weights = {}
        if self.config.score.fusion == "reliability":  # a map whose normal image scores spread widely counts less
            z = scorer.masked(scorer.standardise(raw, self.classes, [name] * len(calib)), inside)
            spread = {k: float(np.std(image_scores(t.numpy(), "max"))) for k, t in z.items()}
            state.weights = {k: 1.0 / max(s, 1e-3) for k, s in spread.items()}
        names = [name] * len(calib)
        fused = scorer.fuse(scorer.standardise(raw, self.classes, names), self.classes, names, calib[0].modalities)
        fused_map = scorer.masked({"fused": fused["fused"]}, inside)["fused"]
        return image_scores(fused_map.numpy().astype(np.float32, copy=False), self.config.score.image_score,
                            self.config.score.topk)

    # ------------------------------------------------------------------ predict

    def _predict_group(self, items: Sequence[SampleFeatures], class_names: Sequence[str | None],
                       sizes: Sequence[tuple[int, int]], keep: Sequence[str] | None = None) -> list[Prediction]:
        """Classes, maps and scores of a batch sharing one modality set. Each sample is scored on the
        modalities its class was learned with (an RGB-only class ignores a sample's geometry)."""
        feats = scorer.stack_features(items)
        with torch.inference_mode():
            names, conf = scorer.predict_classes(list(self.classes.values()), self.ensure_net(), feats,
                                                 class_names, self.config.score.class_by)
        by_mods: dict[tuple[str, ...], list[int]] = {}
        for i, name in enumerate(names):
            mods = tuple(m for m in items[i].modalities if m in self.classes[name].modalities)
            if not mods:
                raise UsageError(f"class {name!r} was learned with {', '.join(self.classes[name].modalities)} "
                                 f"only; this sample has {', '.join(items[i].modalities)}")
            by_mods.setdefault(mods, []).append(i)
        out: list[Prediction | None] = [None] * len(items)
        for mods, idx in by_mods.items():
            part = [items[i] if mods == items[i].modalities else
                    SampleFeatures({m: items[i].features[m] for m in mods},
                                   items[i].foreground if "geometry" in mods else None) for i in idx]
            rows = torch.tensor(idx)
            maps = self._score_group(part, [names[i] for i in idx], [sizes[i] for i in idx],
                                     {m: feats[m][rows] for m in mods}, keep)
            for i, (maps_np, scores) in zip(idx, maps):
                out[i] = Prediction(names[i], conf[i], class_names[i] is not None, scores["fused"], maps_np, scores)
        return out  # type: ignore[return-value]

    def _score_group(self, items: Sequence[SampleFeatures], names: Sequence[str], sizes: Sequence[tuple[int, int]],
                     feats: dict[str, torch.Tensor], keep: Sequence[str] | None = None
                     ) -> list[tuple[GridMaps, dict[str, float]]]:
        """Maps (at each sample's own size; the `keep` ones, None = all) and image scores (of every map) of
        a batch of one modality set, classes known; `feats` are the items' stacked features."""
        sc = self.config.score
        size = self.spec.input_size
        raw, region = scorer.raw_maps(self.ensure_net(), self.classes, items, names, self.config, size, feats)
        z = scorer.standardise(raw, self.classes, names)
        all_maps = scorer.masked({**scorer.fuse(z, self.classes, names, items[0].modalities), **z}, region)
        arrays = {k: t.numpy().astype(np.float32, copy=False) for k, t in all_maps.items()}
        batch_scores = {k: image_scores(a, sc.image_score, sc.topk) for k, a in arrays.items()}
        out = []
        for i, (h, w) in enumerate(sizes):
            maps_np = GridMaps({k: a[i] for k, a in arrays.items() if keep is None or k in keep}, (h, w))
            if (h, w) == (size, size):
                scores = {k: float(v[i]) for k, v in batch_scores.items()}
            else:  # scored at the sample's resolution, one map at a time
                scores = {k: float(image_scores(upsample(a[i], (h, w))[None], sc.image_score, sc.topk)[0])
                          for k, a in arrays.items()}
            out.append((maps_np, scores))
        return out

    def predict_features(self, items: Sequence[SampleFeatures], class_names: Sequence[str | None],
                         sizes: Sequence[tuple[int, int]], keep: Sequence[str] | None = None) -> list[Prediction]:
        """Predictions for precomputed features; samples are grouped by modality set internally. `keep`:
        the maps the predictions hold (None: all; a step's evaluation holds a whole set's, and needs only
        "fused"); scores are of every map."""
        if not self.classes:
            raise UsageError("the model has learned no class yet; add one first")
        out: list[Prediction | None] = [None] * len(items)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, s in enumerate(items):
            groups.setdefault(s.modalities, []).append(i)
        for idx in (b for group in groups.values() for b in batches(group, SCORE_BATCH)):
            # a batch's full-size maps stay in the CPU cache; the whole set's did not
            preds = self._predict_group([items[i] for i in idx], [class_names[i] for i in idx],
                                        [sizes[i] for i in idx], keep)
            for i, p in zip(idx, preds):
                out[i] = p
        return out  # type: ignore[return-value]

    def predict_records(self, records: Sequence[SampleRecord], class_name: str | None = None,
                        progress: ProgressFn = no_progress, samples: Sequence[Sample] | None = None
                        ) -> list[Prediction]:
        """Score files on disk; class_name None = predict each sample's class ("auto"). With a class
        given, only the modalities that class was learned with are read. `samples`: the records already
        read (`load_sample`), by a caller that had to read them to check them (the service)."""
        mods = MODALITIES if class_name is None or class_name not in self.classes else self.classes[class_name].modalities
        if self.classes:
            self.ensure_net()  # here, not raced by the workers
        release_free_memory()  # what the caller freed before (a step's training): the workers' heaps start low

        def work(batch: Sequence[int]) -> list[Prediction]:  # on one worker: files -> maps
            recs = [records[i] for i in batch]
            feats = (self.extractor.extract(recs, mods, parallel=False) if samples is None else
                     self.extractor.extract_samples([samples[i] for i in batch], mods, parallel=False))
            return self.predict_features(feats, [class_name] * len(batch), [record_size(r) for r in recs])

        out: list[Prediction] = []
        progress("predict", 0, len(records))
        with inter_op(self.extractor.workers) as pool:
            for preds in pool.map(work, self.extractor.worker_batches(range(len(records)))):
                out += preds
                progress("predict", len(out), len(records))
        release_free_memory()  # once for every batch the workers ran (`FeatureExtractor.extract`)
        return out

    def predict(self, sample: Sample, class_name: str | None = None) -> Prediction:
        """Score one loaded sample; class_name None = predicted."""
        (feats,) = self.extractor.extract_samples([sample])
        return self.predict_features([feats], [class_name], [sample.size])[0]
