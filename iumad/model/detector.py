"""The unified detector: fit / predict / evaluate / save / load around the network, the retrieval
memory and per-class calibration.

Scoring, per present modality m of a sample of class c:
  reconstruction map  1 - cos(F_m, decoder(F_m | text_c))   per token
  retrieval map       distance of each (3x3-averaged) token to c's memory of normal tokens
Each map is upsampled to the input size, smoothed (Gaussian, sigma 4) and standardised with the mean and
standard deviation that class c's held-out normal samples give for it. A modality's map is the weighted
mean of its branches; the fused map is the mean over modalities; pixels farther than a few pixels from
the object (when geometry gives a foreground) are set to the map's minimum, so the retrieval search
skips the tokens that cannot reach a pixel near it. Image score = max of the fused map (or top-k mean).

`predict_records` runs files -> maps in batches on one worker per core (`features.inter_op`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from iumad import __version__, distributed
from iumad.config import Config, from_dict
from iumad.data.geometry import cross_dilation
from iumad.data.io import image_size, read_mask
from iumad.data.sample import Sample, SampleRecord
from iumad.errors import DataError, IumadError, UsageError
from iumad.eval.metrics import compute_all
from iumad.model.backbone import BackboneSpec, FrozenBackbone
from iumad.model.feature_cache import FeatureCache
from iumad.model.features import MODALITIES, FeatureExtractor, SampleFeatures, batches, inter_op
from iumad.model.fusion import ib_loss
from iumad.model.network import IUMADNet, anomaly_tokens, reconstruction_loss
from iumad.model.retrieval import coreset, local_tokens, nearest_distance, search_matrix
from iumad.progress import ProgressFn, no_progress
from iumad.store.atomic import CHECKPOINT_FILE, atomic_write_bytes

BRANCHES = ("reconstruction", "retrieval")
MANIFEST = "detector.json"
PROTOTYPE_TEMPERATURE = 0.02  # cosine similarities -> class probabilities (softmax(sim / T))
SCORE_BATCH = 16  # samples scored together
BANK_CHUNK = 16  # samples turned into memory tokens together


@dataclass
class ClassState:
    """What the detector keeps per learned class: no classifier weights, only data."""

    name: str
    modalities: tuple[str, ...]
    text: torch.Tensor  # (384,) unit sentence embedding
    banks: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (M, C) float16 memory
    prototypes: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (P, C) unit descriptors
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # "branch/modality" -> (mean, sd)
    _search: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def search_matrix(self, modality: str) -> torch.Tensor:
        """`retrieval.search_matrix` of the modality's memory, kept while that memory is the current one."""
        bank = self.banks[modality]
        hit = self._search.get(modality)
        if hit is None or hit[0] is not bank:  # a rebuilt memory is a new tensor
            hit = self._search[modality] = (bank, search_matrix(bank))
        return hit[1]


@dataclass
class Prediction:
    """Scores and maps of one sample; maps are (H, W) float32 at the sample's own resolution."""

    class_name: str
    class_probability: float
    class_given: bool
    score: float
    maps: dict[str, np.ndarray]  # "fused", "rgb", "geometry", and "branch/modality" maps
    branch_scores: dict[str, float]  # image score of every map


@functools.lru_cache(maxsize=16)
def _map_operator(grid: int, size: int, sigma: float) -> torch.Tensor:
    """(size, grid): bilinear upsampling (align_corners=False), then Gaussian smoothing with reflect
    padding (radius 4 sigma), along one axis.

    Both steps are linear and separable, so a token map T becomes A @ T @ A.T at the input size: two
    small matrix products instead of upsampling and then two 33-tap convolutions over the full map."""
    up = F.interpolate(torch.eye(grid)[None], size=size, mode="linear", align_corners=False)[0]  # row j: U[:, j]
    if sigma > 0:
        radius = max(1, int(4 * sigma + 0.5))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        up = F.conv1d(F.pad(up[:, None], (radius, radius), mode="reflect"), (k / k.sum()).view(1, 1, -1))[:, 0]
    return up.t().contiguous()


def token_maps_to_image(tokens: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """(B, G, G) per-token scores -> (B, size, size) maps, upsampled bilinearly and smoothed (sigma in
    pixels of the output)."""
    a = _map_operator(tokens.shape[-1], size, float(sigma))
    return a @ tokens.float() @ a.t()


def tokens_reaching(region: torch.Tensor, grid: int, sigma: float) -> torch.Tensor:
    """(B, S, S) bool scored pixels -> (B, G, G) bool: the tokens whose value reaches one of them through
    `token_maps_to_image`. The others cannot change a scored pixel, so their retrieval search is skipped
    (about half the tokens on an MVTec 3D object). A sample without scored pixels needs every token."""
    support = (_map_operator(grid, region.shape[-1], float(sigma)) != 0).float()  # (S, G)
    reach = (support.t() @ region.float() @ support) > 0
    reach[~region.flatten(1).any(1)] = True
    return reach


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class Detector:
    """One model for every class: `fit(samples_by_class)`, `predict(sample, class_name=None)`."""

    def __init__(self, config: Config | None = None, cache_dir: Path | None = None) -> None:
        self.config = config or Config()
        b = self.config.backbone
        self.spec = BackboneSpec(b.name, b.weights, tuple(b.levels), b.input_size)
        self.cache_dir = cache_dir
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
            self._backbone = FrozenBackbone(self.spec)
        return self._backbone

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            cache = FeatureCache(self.cache_dir) if self.cache_dir is not None else None
            self._extractor = FeatureExtractor(self.backbone, cache)
        return self._extractor

    def _ensure_net(self) -> IUMADNet:
        if self.net is None:
            seed_everything(self.config.train.seed)
            self.net = IUMADNet(self.config.model, self.backbone.out_channels)
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
        """Train on several classes at once (the joint "10-0" setting) and calibrate each."""
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
        self.train([(n, s) for n, fs in feats.items() for s in fs], progress=progress)
        for name, f in feats.items():
            self.calibrate(name, f, val.get(name))
        return self

    def train(self, items: Sequence[tuple[str, SampleFeatures]], epochs: int | None = None,
              progress: ProgressFn = no_progress, distill=None) -> list[float]:
        """Optimise the network on (class name, features) pairs; returns the mean loss of each epoch.

        `distill(batch_feats, text, out, class_idx) -> loss`, if given, adds a distillation term."""
        cfg = self.config
        net = self._ensure_net()
        seed_everything(cfg.train.seed)
        epochs = cfg.train.epochs if epochs is None else epochs
        names = self.class_names
        class_texts = self.class_texts()
        groups: dict[tuple[str, ...], list[tuple[int, SampleFeatures]]] = {}
        for name, s in items:
            groups.setdefault(s.modalities, []).append((names.index(name), s))
        world, rank = distributed.world_size(), distributed.rank()
        model = net
        if world > 1:  # each rank trains its share of every batch; DDP averages the gradients
            model = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        bs = cfg.train.batch_size
        steps_per_epoch = sum(math.ceil(len(g) / bs) for g in groups.values())
        total = max(1, epochs * steps_per_epoch)
        if total >= 4:  # one-cycle warm-up over >= 2 steps (its phases need that), else a constant rate
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.train.lr, total_steps=total,
                                                        pct_start=min(0.5, max(0.1, 2 / total)))
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        gen = random.Random(cfg.train.seed)
        losses = []
        net.train()
        for epoch in range(epochs):
            batches = []
            for mods, group in groups.items():
                order = list(range(len(group)))
                gen.shuffle(order)
                batches += [(mods, [group[i] for i in order[j:j + bs]]) for j in range(0, len(order), bs)]
            gen.shuffle(batches)
            running = 0.0
            for mods, batch in batches:
                if world > 1:
                    batch = batch[rank::world] or batch[:1]
                y = torch.tensor([c for c, _ in batch])
                feats = {m: torch.from_numpy(np.stack([s.features[m] for _, s in batch])).float() for m in mods}
                text = class_texts[y]
                out = model(feats, text, class_texts)
                lc = cfg.loss
                loss = torch.zeros(())
                for m in mods:
                    cos, mse = reconstruction_loss(feats[m], out.recon[m])
                    loss = loss + lc.cosine * cos + lc.mse * mse
                if len(names) > 1:
                    loss = loss + lc.cls * (F.cross_entropy(out.logits_decoder, y) + F.cross_entropy(out.logits_fused, y))
                    loss = loss + lc.ib * ib_loss(out.logits_fused, out.logits_bottleneck)
                elif world > 1:  # DDP waits for a gradient of every output it saw
                    loss = loss + 0 * (out.logits_decoder.sum() + out.logits_fused.sum() + out.logits_bottleneck.sum())
                if cfg.model.variational:
                    loss = loss + cfg.model.beta * out.kl
                if distill is not None:
                    loss = loss + distill(feats, text, out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                running += float(loss.detach())
            losses.append(running / max(1, len(batches)))
            progress("train", epoch + 1, epochs, f"loss {losses[-1]:.4f}")
        net.eval()
        return losses

    def calibrate(self, name: str, train: Sequence[SampleFeatures],
                  calibration: Sequence[SampleFeatures] | None = None) -> None:
        """Build the class's retrieval memory and the statistics that standardise its maps.

        Statistics come from `calibration` normals (validation split) when given, else from every fifth
        training sample, which is then left out of the memory so its distances are honest."""
        if calibration:
            bank_items, calib = list(train), list(calibration)
        else:
            calib = list(train[::5])
            bank_items = [s for i, s in enumerate(train) if i % 5 != 0] or list(train)
        self.build_banks(name, bank_items)
        self.calibrate_stats(name, calib)

    def build_banks(self, name: str, items: Sequence[SampleFeatures], extend: bool = False) -> None:
        """The class's memories of its normal data, both of frozen features and so never forgotten: a
        coreset of its tokens per modality (retrieval) and of its samples' pooled descriptors (class
        prediction). `extend` keeps the current memories in the pool (an update step adds new normal
        data to what was learned)."""
        state = self.classes[name]
        sc = self.config.score
        old_banks, old_protos = (state.banks, state.prototypes) if extend else ({}, {})
        state.banks, state.prototypes = {}, {}
        for m in state.modalities:
            present = [s.features[m] for s in items if m in s.features]
            descs, tokens = self._memory_rows(present, sc.retrieval)
            if m in old_protos:
                descs = torch.cat([descs, old_protos[m].float()]) if len(descs) else old_protos[m].float()
            if len(descs):
                state.prototypes[m] = coreset(descs, sc.prototypes, seed=self.config.train.seed).to(torch.float16)
            if not sc.retrieval:
                continue
            if m in old_banks:
                tokens = torch.cat([tokens, old_banks[m].float()]) if len(tokens) else old_banks[m].float()
            if len(tokens):
                state.banks[m] = coreset(tokens, sc.bank_size, seed=self.config.train.seed).to(torch.float16)

    @staticmethod
    def _memory_rows(features: Sequence[np.ndarray], with_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) pooled descriptors and (N * G * G, C) 3x3-averaged tokens of N samples' (C, G, G)
        features, converted to float32 BANK_CHUNK samples at a time (the whole class at once cost 0.4 GB
        per modality at 224 px and was the process's peak memory)."""
        c, g = (features[0].shape[0], features[0].shape[1] * features[0].shape[2]) if features else (0, 0)
        descs = torch.empty(len(features), c)
        tokens = torch.empty(len(features) * g if with_tokens else 0, c)
        for i in range(0, len(features), BANK_CHUNK):
            chunk = torch.from_numpy(np.stack(features[i:i + BANK_CHUNK]))
            descs[i:i + len(chunk)] = pooled_descriptors(chunk)
            if with_tokens:
                tokens[i * g:(i + len(chunk)) * g] = local_tokens(chunk).permute(0, 2, 3, 1).reshape(-1, c)
        return descs, tokens

    def calibrate_stats(self, name: str, calibration: Sequence[SampleFeatures]) -> None:
        """Mean and spread of every raw map on held-out normals of the class (never trained on); rerun
        for old classes after each incremental step, since the network that makes their maps changed."""
        state = self.classes[name]
        calib = list(calibration)
        if not calib:
            raise DataError(f"class {name!r}: no held-out normal sample to calibrate its scores")
        state.stats = {}
        chunks = [self._raw_maps(batch, [name] * len(batch)) for batch in batches(calib, SCORE_BATCH)]
        raw = {key: torch.cat([c[0][key] for c in chunks]) for key in chunks[0][0]}
        regions = [c[3] for c in chunks]
        inside = None if any(r is None for r in regions) else torch.cat(regions)
        for key, maps in raw.items():
            values = maps[inside] if inside is not None and inside.any() else maps.flatten()
            state.stats[key] = (float(values.mean()), float(values.std().clamp_min(1e-6)))

    # ------------------------------------------------------------------ scoring

    def _score_region(self, items: Sequence[SampleFeatures], size: int) -> torch.Tensor | None:
        """(B, S, S) bool: pixels near the object, or None when any sample lacks a foreground."""
        if any(s.foreground is None for s in items):
            return None
        dil = self.config.score.foreground_dilation
        region = torch.from_numpy(cross_dilation(np.stack([s.foreground for s in items]), dil))
        if region.shape[-1] != size:
            region = F.interpolate(region[:, None].float(), size=(size, size), mode="nearest")[:, 0] > 0.5
        return region

    @torch.inference_mode()
    def _raw_maps(self, items: Sequence[SampleFeatures], class_names: Sequence[str | None]
                  ) -> tuple[dict[str, torch.Tensor], list[str], list[float], torch.Tensor | None]:
        """Unstandardised smoothed maps at input size for a batch sharing one modality set, the class
        names and probabilities, and the scored region (`_score_region`). Outside the region the
        retrieval maps are not final (only tokens that reach it are searched).

        A None class name is predicted (score.class_by): as the class whose pooled-descriptor prototypes
        lie nearest (prototypes), by the cosine text classifier on F_fu (classifier), or as the class
        whose normal-token memory lies nearest to the sample's tokens (memory)."""
        net = self._ensure_net()
        net.eval()
        sc = self.config.score
        mods = items[0].modalities
        feats = {m: torch.from_numpy(np.stack([s.features[m] for s in items])).float() for m in mods}
        fused, gated, _ = net.encode(feats)
        g = feats[mods[0]].shape[-1]
        # "auto" picks among classes learned with the same modalities as the sample
        same = torch.tensor([set(c.modalities) == set(mods) for c in self.classes.values()])
        # a checkpoint from before prototypes existed has none: its classes are told apart by the classifier
        if sc.class_by == "prototypes" and all(c.prototypes for c in self.classes.values()):
            probs = (self._prototype_similarities(feats) / PROTOTYPE_TEMPERATURE).softmax(-1)
        elif sc.class_by == "memory":
            probs = (-self._memory_distances(feats)).softmax(-1)
        else:
            probs = net.adaptor.logits(fused, self.class_texts()).softmax(-1)
        names, conf = [], []
        for i, given in enumerate(class_names):
            if given is None:
                k = int(probs[i].masked_fill(~same, -1).argmax()) if same.any() else int(probs[i].argmax())
                names.append(self.class_names[k])
            else:
                if given not in self.classes:
                    raise UsageError(f"unknown class {given!r}; known: {', '.join(self.class_names) or 'none'}")
                names.append(given)
            conf.append(float(probs[i, self.class_names.index(names[-1])]))
        recon = {}
        if sc.reconstruction:
            text = torch.stack([self.classes[n].text for n in names])
            recon, _ = net.decode(gated, text, (g, g), mods)
        size = self.spec.input_size
        sigma = sc.sigma * size / 224
        region = self._score_region(items, size)
        reach = None if region is None or not sc.retrieval else tokens_reaching(region, g, sigma)
        raw: dict[str, torch.Tensor] = {}
        for m in mods:
            per_token = {"reconstruction": anomaly_tokens(feats[m], recon[m])} if sc.reconstruction else {}
            if sc.retrieval:
                dist = torch.zeros(len(names), g, g)
                for n in set(names):  # one query per class memory, not per sample
                    idx = [i for i, k in enumerate(names) if k == n]
                    if m in self.classes[n].banks:
                        dist[idx] = nearest_distance(feats[m][idx], self.classes[n].search_matrix(m),
                                                     where=None if reach is None else reach[idx])
                per_token["retrieval"] = dist
            for branch, tok in per_token.items():
                raw[f"{branch}/{m}"] = token_maps_to_image(tok, size, sigma)
        return raw, names, conf, region

    def _prototype_similarities(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K): per sample and class, the cosine similarity of the sample's pooled descriptor to the
        class's nearest prototype, averaged over the modalities both have (-inf where they share none)."""
        b = next(iter(feats.values())).shape[0]
        out = torch.full((b, len(self.classes)), float("-inf"))
        query = {m: pooled_descriptors(f) for m, f in feats.items()}
        for k, c in enumerate(self.classes.values()):
            sims = [(q @ c.prototypes[m].float().t()).amax(1) for m, q in query.items() if m in c.prototypes]
            if sims:
                out[:, k] = torch.stack(sims).mean(0)
        return out

    def _memory_distances(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K): per sample and class, the mean nearest-neighbour distance of the sample's tokens to the
        class's memory, averaged over modalities (inf where the class has no memory for them)."""
        b = next(iter(feats.values())).shape[0]
        out = torch.full((b, len(self.classes)), float("inf"))
        for k, c in enumerate(self.classes.values()):
            if all(m in c.banks for m in feats):
                out[:, k] = torch.stack([nearest_distance(f, c.search_matrix(m)).flatten(1).mean(1)
                                         for m, f in feats.items()]).mean(0)
        return out

    def _predict_group(self, items: Sequence[SampleFeatures], class_names: Sequence[str | None],
                       sizes: Sequence[tuple[int, int]]) -> list[Prediction]:
        """Standardise, weight, fuse and mask the maps of a batch sharing one modality set, all samples
        at once (per-sample tensor work here used to cost more than the backbone)."""
        raw, names, conf, region = self._raw_maps(items, class_names)
        size = self.spec.input_size
        sc = self.config.score
        z = {}
        for key, maps in raw.items():
            stats = torch.tensor([self.classes[n].stats.get(key, (0.0, 1.0)) for n in names])
            z[key] = (maps - stats[:, 0, None, None]) / stats[:, 1, None, None]
        per_mod = {}
        for m in items[0].modalities:
            parts = [(z[f"{b}/{m}"], 1.0 if b == "reconstruction" else sc.retrieval_weight)
                     for b in BRANCHES if f"{b}/{m}" in z]
            per_mod[m] = sum(w * t for t, w in parts) / sum(w for _, w in parts)
        all_maps = {"fused": torch.stack(list(per_mod.values())).mean(0), **per_mod, **z}
        if region is not None:  # off the object: the map's minimum on it
            for k, t in all_maps.items():
                floor = t.masked_fill(~region, float("inf")).amin(dim=(1, 2))
                floor = torch.where(torch.isfinite(floor), floor, t.amin(dim=(1, 2)))
                all_maps[k] = torch.where(region, t, floor[:, None, None])
        arrays = {k: t.numpy().astype(np.float32, copy=False) for k, t in all_maps.items()}
        batch_scores = {k: self._image_scores(a) for k, a in arrays.items()}
        preds = []
        for i, name in enumerate(names):
            h, w = sizes[i]
            if (h, w) == (size, size):
                maps_np = {k: a[i] for k, a in arrays.items()}
                scores = {k: float(v[i]) for k, v in batch_scores.items()}
            else:
                maps_np = {k: F.interpolate(t[i][None, None], size=(h, w), mode="bilinear",
                                            align_corners=False)[0, 0].numpy() for k, t in all_maps.items()}
                scores = {k: float(self._image_scores(v[None])[0]) for k, v in maps_np.items()}
            preds.append(Prediction(name, conf[i], class_names[i] is not None, scores["fused"], maps_np, scores))
        return preds

    def _image_scores(self, maps: np.ndarray) -> np.ndarray:
        """(B, H, W) -> (B,) image scores: the maximum, or the mean of the top `topk` share of pixels."""
        flat = maps.reshape(len(maps), -1)
        if self.config.score.image_score == "topk":
            k = max(1, int(self.config.score.topk * flat.shape[1]))
            return np.partition(flat, -k, axis=1)[:, -k:].mean(1)
        return flat.max(1)

    def predict_features(self, items: Sequence[SampleFeatures], class_names: Sequence[str | None],
                         sizes: Sequence[tuple[int, int]]) -> list[Prediction]:
        """Predictions for precomputed features; samples are grouped by modality set internally."""
        if not self.classes:
            raise UsageError("the model has learned no class yet; add one first")
        out: list[Prediction | None] = [None] * len(items)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, s in enumerate(items):
            groups.setdefault(s.modalities, []).append(i)
        for idx in (b for group in groups.values() for b in batches(group, SCORE_BATCH)):
            # a batch's full-size maps stay in the CPU cache; the whole set's did not
            preds = self._predict_group([items[i] for i in idx], [class_names[i] for i in idx],
                                        [sizes[i] for i in idx])
            for i, p in zip(idx, preds):
                out[i] = p
        return out  # type: ignore[return-value]

    def predict_records(self, records: Sequence[SampleRecord], class_name: str | None = None,
                        progress: ProgressFn = no_progress) -> list[Prediction]:
        """Score files on disk; class_name None = predict each sample's class ("auto"). With a class
        given, only the modalities that class was learned with are read."""
        mods = MODALITIES if class_name is None or class_name not in self.classes else self.classes[class_name].modalities
        if self.classes:
            self._ensure_net()  # here, not raced by the workers

        def work(batch: Sequence[SampleRecord]) -> list[Prediction]:  # on one worker: files -> maps
            feats = self.extractor.extract(batch, mods, parallel=False)
            return self.predict_features(feats, [class_name] * len(batch), [record_size(r) for r in batch])

        out: list[Prediction] = []
        progress("predict", 0, len(records))
        with inter_op(self.extractor.workers) as pool:
            for preds in pool.map(work, self.extractor.worker_batches(records)):
                out += preds
                progress("predict", len(out), len(records))
        return out

    def predict(self, sample: Sample, class_name: str | None = None) -> Prediction:
        """Score one loaded sample; class_name None = predicted by the classifier."""
        (feats,) = self.extractor.extract_samples([sample])
        return self.predict_features([feats], [class_name], [sample.size])[0]

    def evaluate(self, records: Sequence[SampleRecord], class_name: str,
                 progress: ProgressFn = no_progress) -> dict[str, dict[str, float]]:
        """Metrics of the fused map and of every single map on a labelled set of one class."""
        preds = self.predict_records(records, class_name, progress)
        gts = np.stack([read_gt(r, p.maps["fused"].shape) for r, p in zip(records, preds)])
        return {key: compute_all(np.stack([p.maps[key] for p in preds]), gts)
                for key in preds[0].maps if "/" not in key}

    # ------------------------------------------------------------------ persistence

    def save(self, folder: Path) -> str:
        """Write model.pt (tensors) and detector.json (config, classes, model.pt's sha256); returns the sha256."""
        if self.net is None:
            raise UsageError("nothing to save: the model has not been trained")
        folder = Path(folder)
        tensors = {"net": self.net.state_dict(),
                   "classes": {n: {"text": c.text, "banks": c.banks, "prototypes": c.prototypes}
                               for n, c in self.classes.items()}}
        buf = io.BytesIO()
        torch.save(tensors, buf)
        digest = atomic_write_bytes(folder / CHECKPOINT_FILE, buf.getvalue())
        manifest = {
            "iumad_version": __version__,
            "config": self.config.to_dict(),
            "classes": [{"name": c.name, "modalities": list(c.modalities), "stats": c.stats}
                        for c in self.classes.values()],
            "checkpoint": CHECKPOINT_FILE,
            "sha256": digest,
        }
        atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=2).encode())
        return digest

    @classmethod
    def load(cls, folder: Path, expected_sha256: str | None = None, cache_dir: Path | None = None) -> "Detector":
        """Load a saved detector; refuses a checkpoint whose sha256 differs from the recorded one."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            raise IumadError(f"{folder / MANIFEST}: missing or unreadable ({exc.__class__.__name__})") from None
        ckpt = folder / manifest.get("checkpoint", CHECKPOINT_FILE)
        data = ckpt.read_bytes() if ckpt.is_file() else None
        if data is None:
            raise IumadError(f"{ckpt}: checkpoint missing; restore it or roll back to another model version")
        digest = hashlib.sha256(data).hexdigest()
        for want in filter(None, (manifest.get("sha256"), expected_sha256)):
            if digest != want:
                raise IumadError(f"{ckpt}: sha256 {digest[:12]}… does not match the recorded {want[:12]}…; "
                                 "the file was changed or corrupted, refusing to load it")
        tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        det = cls(from_dict(manifest["config"], str(folder / MANIFEST)), cache_dir=cache_dir)
        for c in manifest["classes"]:
            t = tensors["classes"][c["name"]]
            det.classes[c["name"]] = ClassState(c["name"], tuple(c["modalities"]), t["text"], dict(t["banks"]),
                                                dict(t.get("prototypes", {})),
                                                {k: tuple(v) for k, v in c["stats"].items()})
        det._ensure_net().load_state_dict(tensors["net"], strict=True)
        det.net.eval()
        return det


def pooled_descriptors(feats: torch.Tensor) -> torch.Tensor:
    """(B, C, G, G) frozen features -> (B, C) unit-length spatial means: what a sample looks like overall."""
    return F.normalize(feats.float().mean(dim=(2, 3)), dim=1)


def record_size(record: SampleRecord) -> tuple[int, int]:
    """(H, W) of a record's images from their headers."""
    return image_size(record.rgb if record.rgb is not None else record.geometry)


def read_gt(record: SampleRecord, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask of a test record; all-False for a good sample without a mask file."""
    if record.gt is not None:
        return read_mask(record.gt, shape)
    if record.label != "good":
        raise DataError(f"{record.rgb or record.geometry}: defective test sample without a gt mask; add it")
    return np.zeros(shape, dtype=bool)
