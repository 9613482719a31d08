"""Records -> frozen features per modality, computed once and cached.

Batches are read, prepared (geometry image) and passed through the backbone by `inter_op` workers, one
torch thread each, so the cores stay busy without contending (PIL, zlib, numpy and torch release the GIL).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from iumad.data.geometry import preprocessing_key, sample_geometry_image
from iumad.data.loading import at_size, load_sample
from iumad.data.sample import Sample, SampleRecord
from iumad.errors import DataError
from iumad.heap import release_free_memory
from iumad.model.backbone import FrozenBackbone, to_chw
from iumad.model.feature_cache import FeatureCache, cache_key
from iumad.progress import ProgressFn, no_progress
from iumad.files import file_sha256

T = TypeVar("T")
RGB_PREPROCESSING = "rgb-v2"  # PIL bilinear resize to the backbone's input size
GEOMETRY_READ = "nearest-to-input"  # geometry resampled to the input size as it is read, then processed
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
                 geometry_options: dict | None = None, batch_size: int = 4, workers: int | None = None) -> None:
        self.backbone = backbone
        self.cache = cache
        self.geometry_options = dict(geometry_options or {})
        self.batch_size = batch_size  # samples per task of a worker
        self.workers = workers  # None: one per torch thread
        self.size = backbone.spec.input_size
        self._backbone_id = backbone.spec.cache_id() if cache is not None else ""
        self._prep = {"rgb": RGB_PREPROCESSING,
                      "geometry": f"{preprocessing_key(**self.geometry_options)};{GEOMETRY_READ}"}

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
                progress: ProgressFn = no_progress, stage: str = "features",
                parallel: bool = True) -> list[SampleFeatures]:
        """Features for every record, in order; only cache misses are read from disk, in batches on the
        `inter_op` workers (`parallel=False`: in the calling thread, for a caller that is a worker; that caller
        hands the freed heap back once it is done, since trimming after every batch makes the next one fault
        its memory back in)."""
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

        def work(batch: list[tuple[int, dict[str, str]]]) -> list[SampleFeatures]:
            return self._features([load_sample(records[i], self.size) for i, _ in batch], modalities)

        todo_batches = self.worker_batches(todo, parallel)
        with inter_op(self.workers) if parallel else nullcontext() as pool:
            for batch, feats in zip(todo_batches, pool.map(work, todo_batches) if pool else map(work, todo_batches)):
                for (i, keys), f in zip(batch, feats):
                    out[i] = f
                    if self.cache is not None:
                        for m, arr in f.features.items():
                            self.cache.put(keys[m], arr)
                        if f.foreground is not None:
                            self.cache.put(keys["foreground"], f.foreground)
                done += len(batch)
                progress(stage, done, len(records))
        if parallel:  # a worker's caller trims once when all its batches are done
            release_free_memory()  # the backbone's activations: else the heaps keep them (`iumad.heap`)
        return out  # type: ignore[return-value]

    def extract_samples(self, samples: Sequence[Sample], modalities: Sequence[str] = MODALITIES,
                        parallel: bool = True) -> list[SampleFeatures]:
        """Uncached features of already loaded samples (prediction on arrays, uploads already read,
        tests); batched and threaded as `extract` is, so both give the same numbers (`parallel=False`:
        in the calling thread, for a caller that is a worker)."""
        if not parallel:
            return [f for batch in self.worker_batches(samples, False) for f in self._features(batch, modalities)]
        with inter_op(self.workers) as pool:
            return [f for feats in pool.map(lambda b: self._features(b, modalities), self.worker_batches(samples))
                    for f in feats]

    def worker_batches(self, items: Sequence[T], parallel: bool = True) -> list[list[T]]:
        """`items` cut into the batches this extractor's `inter_op` workers take (`balanced_batches`);
        one worker's share when not `parallel`."""
        return balanced_batches(items, self.batch_size, worker_count(self.workers) if parallel else 1)

    # ------------------------------------------------------------------ internals

    def _features(self, samples: Sequence[Sample], modalities: Sequence[str]) -> list[SampleFeatures]:
        """One batch, in the calling thread: backbone inputs, then the backbone."""
        prepared = [self._prepare_sample(s, modalities) for s in samples]
        return [SampleFeatures(f, fg) for f, (_, fg) in zip(self._run_backbone(prepared), prepared)]

    def _prepare_sample(self, sample: Sample, modalities: Sequence[str]):
        """Backbone inputs (3, S, S) float32 and the foreground at S x S; numpy only. The geometry image
        is computed at S x S (`loading.at_size`), whatever size the sample came in."""
        sample = at_size(sample, self.size)
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
            x = torch.from_numpy(np.stack([batch[j][0][m] for j in idx])).to(self.backbone.mean.device)
            with torch.inference_mode():
                f = self.backbone(x).to(torch.float16).cpu().numpy()
            for j, arr in zip(idx, f):
                results[j][m] = arr
        return results


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter), from any iterable."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def balanced_batches(items: Sequence[T], size: int, workers: int) -> list[list[T]]:
    """At most `size` items per batch, in order, with the number of batches a multiple of `workers` and
    sizes that differ by at most one (larger first): `workers` workers then finish together, instead of
    one running the last short batch alone (108 samples in 27 batches of 4 left a core idle for one)."""
    n = len(items)
    count = -(-n // size)
    count = -(-count // workers) * workers if workers > 1 else count
    count = max(1, min(count, n))
    q, r = divmod(n, count)
    bounds = np.cumsum([0] + [q + 1] * r + [q] * (count - r))
    return [list(items[a:b]) for a, b in zip(bounds[:-1], bounds[1:])] if n else []


def worker_count(workers: int | None = None) -> int:
    """How many `inter_op` workers a pool gets: `workers`, or one per torch thread."""
    return workers or torch.get_num_threads()


@contextmanager
def inter_op(workers: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A pool of `workers` threads (default: torch's thread count) that each run whole batches (read,
    prepare, backbone, scoring) with one torch thread, instead of one batch at a time on every core: no
    OpenMP barrier per layer, and no loader thread preempting a member of torch's team (on 2 cores the
    extraction was a fifth slower). numpy's BLAS is held to one thread as well: its idle threads spin on
    the cores the others need."""
    threads = torch.get_num_threads()
    workers = worker_count(workers)
    if workers > 1:
        torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield pool
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, batches not started yet are dropped
        torch.set_num_threads(threads)
