"""Records -> frozen features per modality, computed once and cached.

Loading, decoding and geometry preprocessing run in a small thread pool while the backbone runs on the
previous batch (PIL, zlib and most numpy/scipy work release the GIL), so the two cores stay busy.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from iumad.data.geometry import preprocessing_key, sample_geometry_image
from iumad.data.loading import load_sample
from iumad.data.sample import Sample, SampleRecord
from iumad.errors import DataError
from iumad.model.backbone import FrozenBackbone, to_chw
from iumad.model.feature_cache import FeatureCache, cache_key
from iumad.progress import ProgressFn, no_progress
from iumad.store.atomic import file_sha256

RGB_PREPROCESSING = "rgb-v2"  # PIL bilinear resize to the backbone's input size
MODALITIES = ("rgb", "geometry")


@dataclass
class SampleFeatures:
    """Frozen features of one sample: (C, G, G) float16 per present modality, and the object mask."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    foreground: np.ndarray | None = None  # (S, S) bool at the input size, from the geometry, if any

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.features)


class FeatureExtractor:
    """Turns records (or loaded samples) into `SampleFeatures`, through the cache when one is given."""

    def __init__(self, backbone: FrozenBackbone, cache: FeatureCache | None = None,
                 geometry_options: dict | None = None, batch_size: int = 16, workers: int = 2) -> None:
        self.backbone = backbone
        self.cache = cache
        self.geometry_options = dict(geometry_options or {})
        self.batch_size = batch_size
        self.workers = workers
        self.size = backbone.spec.input_size
        self._backbone_id = backbone.spec.cache_id() if cache is not None else ""
        self._prep = {"rgb": RGB_PREPROCESSING, "geometry": preprocessing_key(**self.geometry_options)}

    # ------------------------------------------------------------------ keys

    def keys(self, record: SampleRecord, modalities: Sequence[str]) -> dict[str, str]:
        """Cache key of each requested modality the record has, plus 'foreground' with geometry."""
        keys = {}
        for m in modalities:
            path = record.rgb if m == "rgb" else record.geometry
            if path is None:
                continue
            extra = repr(record.depth_range) if m == "geometry" else ""
            digest = file_sha256(path)
            keys[m] = cache_key(digest, m, self._backbone_id, self.size, self._prep[m], extra)
            if m == "geometry":
                keys["foreground"] = cache_key(digest, "foreground", "", self.size, self._prep[m], extra)
        return keys

    # ------------------------------------------------------------------ extraction

    def extract(self, records: Sequence[SampleRecord], modalities: Sequence[str] = MODALITIES,
                progress: ProgressFn = no_progress, stage: str = "features") -> list[SampleFeatures]:
        """Features for every record, in order; only cache misses are read from disk."""
        out: list[SampleFeatures | None] = [None] * len(records)
        todo: list[tuple[int, dict[str, str]]] = []
        for i, rec in enumerate(records):
            keys = self.keys(rec, modalities) if self.cache is not None else {}
            cached = {k: self.cache.get(v) for k, v in keys.items()} if self.cache is not None else {}
            if keys and all(v is not None for v in cached.values()):
                fg = cached.pop("foreground", None)
                out[i] = SampleFeatures(cached, None if fg is None else fg.astype(bool))
            else:
                todo.append((i, keys))
        done = len(records) - len(todo)
        progress(stage, done, len(records))
        loaded = self._prepared((records[i] for i, _ in todo), modalities)
        for batch in _batches(zip(todo, loaded), self.batch_size):
            feats = self._run_backbone([prep for _, prep in batch])
            for ((i, keys), (images, fg)), f in zip(batch, feats):
                out[i] = SampleFeatures(f, fg)
                if self.cache is not None:
                    for m, arr in f.items():
                        self.cache.put(keys[m], arr)
                    if fg is not None:
                        self.cache.put(keys["foreground"], fg)
            done += len(batch)
            progress(stage, done, len(records))
        return out  # type: ignore[return-value]

    def extract_samples(self, samples: Sequence[Sample], modalities: Sequence[str] = MODALITIES) -> list[SampleFeatures]:
        """Uncached features of already loaded samples (prediction on arrays, tests)."""
        prepared = [self._prepare_sample(s, modalities) for s in samples]
        out = []
        for batch in _batches(prepared, self.batch_size):
            out += [SampleFeatures(f, fg) for f, (_, fg) in zip(self._run_backbone(batch), batch)]
        return out

    # ------------------------------------------------------------------ internals

    def _prepared(self, records: Iterable[SampleRecord], modalities: Sequence[str]):
        def job(rec: SampleRecord):
            return self._prepare_sample(load_sample(rec), modalities)

        with ThreadPoolExecutor(self.workers) as pool:
            pending = []
            for rec in records:
                pending.append(pool.submit(job, rec))
                if len(pending) >= 2 * self.batch_size:
                    yield pending.pop(0).result()
            for fut in pending:
                yield fut.result()

    def _prepare_sample(self, sample: Sample, modalities: Sequence[str]):
        """Backbone inputs (3, S, S) float32 and the foreground at S x S; numpy only (loader threads)."""
        images: dict[str, np.ndarray] = {}
        fg = None
        if "rgb" in modalities and sample.rgb is not None:
            images["rgb"] = to_chw(sample.rgb, self.size)
        if "geometry" in modalities and sample.geometry is not None:
            geo = sample_geometry_image(sample, **self.geometry_options)
            images["geometry"] = to_chw(geo.image, self.size)
            h, w = geo.foreground.shape
            rows = (np.arange(self.size) * h // self.size)[:, None]
            cols = (np.arange(self.size) * w // self.size)[None, :]
            fg = geo.foreground[rows, cols]  # nearest-neighbour resize
        if not images:
            where = next(iter(sample.paths.values()), sample.class_name)
            raise DataError(f"{where}: has none of the modalities {', '.join(modalities)}; "
                            "give rgb and/or geometry files for this class")
        return images, fg

    def _run_backbone(self, batch: list) -> list[dict[str, np.ndarray]]:
        results: list[dict[str, np.ndarray]] = [{} for _ in batch]
        for m in MODALITIES:
            idx = [j for j, (images, _) in enumerate(batch) if m in images]
            if not idx:
                continue
            x = torch.from_numpy(np.stack([batch[j][0][m] for j in idx]))
            with torch.inference_mode():
                f = self.backbone(x).to(torch.float16).numpy()
            for j, arr in zip(idx, f):
                results[j][m] = arr
        return results


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
