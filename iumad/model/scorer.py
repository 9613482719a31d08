"""Scoring a batch of cached features: which class, the raw maps of every branch, and their fusion.

Maps per present modality m of a sample of class c:
  mapping        1 - cos(F_m, net's prediction of F_m from the other modality)     (both modalities)
  reconstruction 1 - cos(F_m, net's inpainting of F_m with those tokens hidden)    (otherwise)
  retrieval      distance of each 3x3-averaged token to c's memory of normal tokens
Each is upsampled to the input size, smoothed and standardised with the mean and spread that c's
held-out normals give for it (`calibration`); the fused map is their weighted mean, with the weights
fitted on the same normals.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from iumad.config import Config
from iumad.errors import UsageError
from iumad.model.device import scoring_precision
from iumad.model.features import SampleFeatures
from iumad.model.maps import floor_outside, score_region, token_maps_to_image, tokens_reaching
from iumad.model.memory import ClassState, memory_distances, prototype_similarities
from iumad.model.network import IUMADNet
from iumad.model.retrieval import nearest_distance

PROTOTYPE_TEMPERATURE = 0.02  # cosine similarities -> class probabilities (softmax(sim / T))


def stack_features(items: Sequence[SampleFeatures]) -> dict[str, torch.Tensor]:
    """(B, C, G, G) float32 per modality of a batch sharing one modality set."""
    return {m: torch.from_numpy(np.stack([s.features[m] for s in items])).float() for m in items[0].modalities}


def predict_classes(classes: Sequence[ClassState], net: IUMADNet, feats: dict[str, torch.Tensor],
                    given: Sequence[str | None], class_by: str) -> tuple[list[str], list[float]]:
    """Each sample's class (the given one, or predicted) and its probability.

    Predicted among classes learned with the sample's modalities: as the class whose pooled-descriptor
    prototypes lie nearest (prototypes), by the cosine text classifier on F_fu (classifier), or as the
    class whose normal-token memory lies nearest to the sample's tokens (memory)."""
    names = [c.name for c in classes]
    same = torch.tensor([set(c.modalities) == set(feats) for c in classes])
    if class_by == "prototypes":
        missing = [c.name for c in classes if not c.prototypes]
        if missing:
            raise UsageError(f"class {missing[0]!r} has no prototypes (a checkpoint older than them); "
                             "relearn it with `iumad add-class --update` or set score.class_by: classifier")
        probs = (prototype_similarities(classes, feats) / PROTOTYPE_TEMPERATURE).softmax(-1)
    elif class_by == "memory":
        probs = (-memory_distances(classes, feats)).softmax(-1)
    else:
        dev = net.device
        texts = torch.stack([c.text for c in classes]).to(dev)
        probs = net.fused_logits(net.tokens({m: f.to(dev) for m, f in feats.items()}), texts).softmax(-1).cpu()
    out, conf = [], []
    for i, name in enumerate(given):
        if name is None:
            k = int(probs[i].masked_fill(~same, -1).argmax()) if same.any() else int(probs[i].argmax())
            name = names[k]
        elif name not in names:
            raise UsageError(f"unknown class {name!r}; known: {', '.join(names) or 'none'}")
        out.append(name)
        conf.append(float(probs[i, names.index(name)]))
    return out, conf


@torch.inference_mode()
def raw_maps(net: IUMADNet, classes: dict[str, ClassState], items: Sequence[SampleFeatures],
             names: Sequence[str], cfg: Config, size: int, feats: dict[str, torch.Tensor] | None = None
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Unstandardised smoothed maps at input size ("branch/modality" -> (B, S, S)) for a batch of one
    modality set whose classes are `names`, and the scored region. Outside the region the retrieval
    maps are not final (only tokens that reach it are searched). `feats`: the items' features already
    stacked (`stack_features`), when the caller has them."""
    sc = cfg.score
    feats = stack_features(items) if feats is None else feats
    g = next(iter(feats.values())).shape[-1]
    sigma = sc.sigma * size / 224
    known = [s.foreground if s.foreground is not None else classes[n].region for s, n in zip(items, names)]
    region = score_region([None if k is None else np.asarray(k) for k in known], size, sc.foreground_dilation)
    per_token: dict[str, torch.Tensor] = {}
    dev = net.device
    precision = scoring_precision(sc.precision, dev)
    if sc.learned:
        net.eval()
        texts = torch.stack([classes[n].text for n in names]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            tokens = net.anomaly_tokens({m: f.to(dev) for m, f in feats.items()}, texts)
        per_token.update({k: t.cpu() for k, t in tokens.items()})
    if sc.retrieval:
        reach = None if region is None else tokens_reaching(region, g, sigma)
        for m, f in feats.items():
            dist = torch.zeros(len(names), g, g)
            for n in set(names):  # one query per class memory, not per sample
                idx = [i for i, k in enumerate(names) if k == n]
                if m not in classes[n].banks:
                    raise UsageError(f"class {n!r} has no {m} memory; relearn it with `iumad add-class --update`")
                dist[idx] = nearest_distance(f[idx].to(dev), classes[n].search_matrix(m, precision).to(dev),
                                             where=None if reach is None else reach[idx].to(dev)).cpu()
            per_token[f"retrieval/{m}"] = dist
    return {k: token_maps_to_image(t, size, sigma) for k, t in per_token.items()}, region


def standardise(raw: dict[str, torch.Tensor], classes: dict[str, ClassState], names: Sequence[str]
                ) -> dict[str, torch.Tensor]:
    """Each raw map in standard deviations of its class's held-out normal pixels."""
    z = {}
    for key, maps in raw.items():
        missing = [n for n in set(names) if key not in classes[n].stats]
        if missing:
            raise UsageError(f"class {missing[0]!r} has no calibration for {key}; "
                             "relearn it with `iumad add-class --update`")
        stats = torch.tensor([classes[n].stats[key] for n in names])
        z[key] = (maps - stats[:, 0, None, None]) / stats[:, 1, None, None]
    return z


def fuse(z: dict[str, torch.Tensor], classes: dict[str, ClassState], names: Sequence[str],
         modalities: Sequence[str]) -> dict[str, torch.Tensor]:
    """"fused" and one map per modality: weighted means of the standardised maps (all of them, or the
    modality's), with each class's fitted weights (1 where none was fitted)."""
    def weighted(keys: list[str]) -> torch.Tensor:
        w = torch.tensor([[classes[n].weights.get(k, 1.0) for k in keys] for n in names])  # (B, K)
        maps = torch.stack([z[k] for k in keys], 1)  # (B, K, S, S)
        return (maps * w[..., None, None]).sum(1) / w.sum(1)[:, None, None]

    out = {"fused": weighted(list(z))}
    for m in modalities:
        out[m] = weighted([k for k in z if k.endswith(f"/{m}")])
    return out


def masked(maps: dict[str, torch.Tensor], region: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {k: floor_outside(t, region) for k, t in maps.items()}
