"""What the detector keeps per learned class, all of it data, none of it trained: its text embedding,
a coreset of its normal tokens per modality (the retrieval branch), pooled descriptors of its samples
(class prediction), where its object lies (RGB-only classes), and the statistics and fusion weights
fitted on its held-out normals.

Built from frozen features only, so nothing a later step trains can make a class forget them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from iumad.model.retrieval import (LowPrecisionSearch, candidate_rows, coreset, greedy_coreset, local_tokens,
                                   low_precision_search, nearest_distance, search_matrix)

BANK_CHUNK = 16  # samples turned into memory tokens together
SEARCH_CACHE = 8  # search matrices kept per process: a float32 copy of a memory is twice its size, so keeping
#                   one per class made memory grow with the number of classes (about 5 MB each at 100 classes)
_searches: OrderedDict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | LowPrecisionSearch]] = OrderedDict()
#          (id(bank), precision) -> (bank, what `nearest_distance` searches)
_searches_lock = threading.Lock()  # the service scores on several threads


@dataclass
class ClassState:
    """One learned class: no classifier weights, only data."""

    name: str
    modalities: tuple[str, ...]
    text: torch.Tensor  # (384,) unit sentence embedding
    banks: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (M, C) float16 memory
    prototypes: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (P, C) unit descriptors
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # "branch/modality" -> (mean, sd)
    weights: dict[str, float] = field(default_factory=dict)  # "branch/modality" -> fusion weight
    region: torch.Tensor | None = None  # (S, S) bool where its object lies, RGB-only classes (`data.region`)
    _blob: tuple[tuple, tuple, str] | None = field(default=None, repr=False, compare=False)  # (keys, tensors, sha)

    def _blob_parts(self) -> tuple[tuple, tuple]:
        banks, protos = sorted(self.banks), sorted(self.prototypes)
        return (tuple(banks), tuple(protos)), (self.text, *(self.banks[m] for m in banks),
                                               *(self.prototypes[m] for m in protos), self.region)

    def known_blob(self) -> str | None:
        """The sha256 of this class's saved tensors while they are the very tensors that were saved (a
        rebuilt memory is a new tensor), so a later save need not serialise an unchanged class again."""
        if self._blob is None:
            return None
        keys, tensors, sha = self._blob
        now_keys, now = self._blob_parts()
        return sha if keys == now_keys and all(a is b for a, b in zip(tensors, now)) else None

    def remember_blob(self, sha256: str) -> None:
        self._blob = (*self._blob_parts(), sha256)

    def search_matrix(self, modality: str, precision: str = "float32") -> torch.Tensor | LowPrecisionSearch:
        """`retrieval.search_matrix` of the modality's memory (its `low_precision_search` for "bfloat16"),
        from a small per-process cache of the memories used last (building one costs about a millisecond;
        keeping every class's would not)."""
        return cached_search_matrix(self.banks[modality], precision)


def cached_search_matrix(bank: torch.Tensor, precision: str = "float32") -> torch.Tensor | LowPrecisionSearch:
    """`retrieval.search_matrix(bank)` (or `low_precision_search`), kept for the SEARCH_CACHE memories used
    last. The entry holds the bank itself, so its id cannot be reused by another tensor while it is cached
    (a rebuilt memory is a new tensor, hence a new entry)."""
    key = (id(bank), precision)
    with _searches_lock:
        hit = _searches.get(key)
        if hit is None or hit[0] is not bank:
            search = low_precision_search(bank) if precision == "bfloat16" else search_matrix(bank)
            hit = _searches[key] = (bank, search)
            while len(_searches) > SEARCH_CACHE:
                _searches.popitem(last=False)
        _searches.move_to_end(key)
        return hit[1]


def pooled_descriptors(feats: torch.Tensor) -> torch.Tensor:
    """(B, C, G, G) frozen features -> (B, C) unit-length spatial means: what a sample looks like overall."""
    return F.normalize(feats.float().mean(dim=(2, 3)), dim=1)


def pooled_rows(features: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, C) pooled descriptors of N samples' (C, G, G) features, BANK_CHUNK samples at a time."""
    out = torch.empty(len(features), features[0].shape[0] if features else 0)
    for i in range(0, len(features), BANK_CHUNK):
        out[i:i + BANK_CHUNK] = pooled_descriptors(torch.from_numpy(np.stack(features[i:i + BANK_CHUNK])))
    return out


def token_coreset(features: Sequence[np.ndarray], old: torch.Tensor | None, size: int, seed: int
                  ) -> torch.Tensor | None:
    """`coreset(pool, size, seed)` of the pool of 3x3-averaged tokens that is the N samples' (C, G, G)
    features (N * G * G rows in sample order) followed by `old` (an earlier memory, or None); None for an
    empty pool. Only the pool rows the coreset draws its candidates from are built, BANK_CHUNK samples at
    a time: the whole pool in float32 was 0.2 GB per modality for a class of 220 samples at 288 px, and
    the process's peak memory."""
    old = None if old is None else old.float()
    if not features and (old is None or not len(old)):
        return None
    c = features[0].shape[0] if features else old.shape[1]
    g = features[0].shape[1] * features[0].shape[2] if features else 0
    n_new = len(features) * g
    n = n_new + (0 if old is None else len(old))
    gen = torch.Generator().manual_seed(seed)  # drawn in `coreset`'s order: the candidates, then the rest
    rows = candidate_rows(n, size, gen)
    rows = torch.arange(n) if rows is None else rows
    pool = torch.empty(len(rows), c)
    for i in range(0, len(features), BANK_CHUNK):
        lo, hi = i * g, min(i + BANK_CHUNK, len(features)) * g
        here = (rows >= lo) & (rows < hi)
        if here.any():
            chunk = local_tokens(torch.from_numpy(np.stack(features[i:i + BANK_CHUNK])))
            pool[here] = chunk.permute(0, 2, 3, 1).reshape(-1, c)[rows[here] - lo]
    if old is not None:
        here = rows >= n_new
        pool[here] = old[rows[here] - n_new]
    return greedy_coreset(pool, size, gen)


def build_memories(state: ClassState, features: dict[str, Sequence[np.ndarray]], bank_size: int,
                   prototypes: int, with_tokens: bool, seed: int, extend: bool = False) -> None:
    """The class's memories of its normal data: a coreset of its tokens per modality (retrieval, when
    `with_tokens`) and of its samples' pooled descriptors (class prediction). `extend` keeps the current
    memories in the pool (an update step adds new normal data to what was learned)."""
    old_banks, old_protos = (state.banks, state.prototypes) if extend else ({}, {})
    state.banks, state.prototypes = {}, {}
    for m in state.modalities:
        feats = list(features.get(m, []))
        descs = pooled_rows(feats)
        if m in old_protos:
            descs = torch.cat([descs, old_protos[m].float()]) if len(descs) else old_protos[m].float()
        if len(descs):
            state.prototypes[m] = coreset(descs, prototypes, seed=seed).to(torch.float16)
        bank = token_coreset(feats, old_banks.get(m), bank_size, seed) if with_tokens else None
        if bank is not None:
            state.banks[m] = bank.to(torch.float16)


def prototype_similarities(classes: Sequence[ClassState], feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, K): per sample and class, the cosine similarity of the sample's pooled descriptor to the
    class's nearest prototype, averaged over the modalities both have (-inf where they share none).
    One product with every class's prototypes per modality (`stacked_prototypes`): a loop over the
    classes made a step's evaluation, which asks this for every old class, grow with K squared."""
    b = next(iter(feats.values())).shape[0]
    total = torch.zeros(b, len(classes))
    count = torch.zeros(len(classes))
    for m, f in feats.items():
        matrix, owner, present = stacked_prototypes(classes, m)
        if not present.any():
            continue
        sims = pooled_descriptors(f) @ matrix.t()  # (B, P): every prototype of every class
        best = torch.full((b, len(classes)), float("-inf")).scatter_reduce_(
            1, owner.expand(b, -1), sims, reduce="amax")
        total[:, present] += best[:, present]
        count[present] += 1
    return torch.where(count > 0, total / count.clamp_min(1), torch.tensor(float("-inf")))


_stacks: dict[str, tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_stacks_lock = threading.Lock()


def stacked_prototypes(classes: Sequence[ClassState], modality: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, C) float32 prototypes of every class that has the modality, (P,) the index in `classes` of each
    one's class, (K,) bool which classes have it; kept while the classes hold the very same tensors."""
    tensors = tuple(c.prototypes.get(modality) for c in classes)
    with _stacks_lock:
        hit = _stacks.get(modality)
        if hit is None or len(hit[0]) != len(tensors) or any(a is not b for a, b in zip(hit[0], tensors)):
            have = [(k, t) for k, t in enumerate(tensors) if t is not None]
            dim = have[0][1].shape[1] if have else 0
            matrix = torch.cat([t.float() for _, t in have]) if have else torch.zeros(0, dim)
            owner = torch.cat([torch.full((len(t),), k) for k, t in have]) if have else torch.zeros(0, dtype=torch.long)
            hit = _stacks[modality] = (tensors, matrix, owner,
                                       torch.tensor([t is not None for t in tensors], dtype=torch.bool))
        return hit[1], hit[2], hit[3]


def memory_distances(classes: Sequence[ClassState], feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, K): per sample and class, the mean nearest-neighbour distance of the sample's tokens to the
    class's memory, averaged over modalities (inf where the class has no memory for them)."""
    b = next(iter(feats.values())).shape[0]
    out = torch.full((b, len(classes)), float("inf"))
    for k, c in enumerate(classes):
        if all(m in c.banks for m in feats):
            out[:, k] = torch.stack([nearest_distance(f, c.search_matrix(m)).flatten(1).mean(1)
                                     for m, f in feats.items()]).mean(0)
    return out
