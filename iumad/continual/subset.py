"""The fixed evaluation subset of a class (`continual.evaluation_budget`).

Why: evaluating every learned class on its whole evaluation set at every step makes a step cost O(K)
full evaluations. With a budget, an old class is evaluated on a subset of `budget` samples chosen once
(when the class arrives, or at the first step that applies the budget) and recorded in the store with
its evaluation set, so every later cell of R is measured on the same samples and stays comparable.

The subset is stratified: good and defect samples in the proportion the whole set has them, at least one
of each when both exist (an AUROC needs both), defect samples spread over the defect types. It is drawn
with a generator seeded by the training seed and the class name from the records sorted by key, so the
same set, seed and budget give the same subset whatever order the folder is listed in.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from iumad.data.sample import SampleRecord


def sample_key(record: SampleRecord) -> str:
    """The identity a subset records: the sample's primary file (RGB, else geometry), resolved."""
    path = record.rgb if record.rgb is not None else record.geometry
    return str(Path(path).resolve())  # type: ignore[arg-type]


def choose_subset(records: Sequence[SampleRecord], budget: int, seed: int, name: str) -> dict[str, Any]:
    """{"budget", "seed", "keys"}: at most `budget` sample keys, stratified (see the module docstring).
    A set no larger than the budget is taken whole."""
    by_key = {sample_key(r): r for r in records}
    keys = sorted(by_key)
    if len(keys) <= budget:
        return {"budget": int(budget), "seed": int(seed), "keys": keys}
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
    good = [k for k in keys if by_key[k].label == "good"]
    defect_types = sorted({by_key[k].label for k in keys} - {"good"})
    n_defect = len(keys) - len(good)
    take_defect = int(round(budget * n_defect / len(keys)))
    if good and n_defect:  # both kinds present: at least one of each
        take_defect = min(max(take_defect, 1), budget - 1)
    take_defect = min(take_defect, n_defect)
    take_good = min(budget - take_defect, len(good))
    take_defect = min(budget - take_good, n_defect)  # a short good stratum leaves room for defects
    chosen = [good[i] for i in rng.permutation(len(good))[:take_good]]
    pools = []
    for t in defect_types:  # each type shuffled, then taken in turns: every type is represented
        members = [k for k in keys if by_key[k].label == t]
        pools.append([members[i] for i in rng.permutation(len(members))])
    order = rng.permutation(len(pools)) if pools else []
    turn: list[str] = []
    depth = 0
    while len(turn) < take_defect:
        for j in order:
            if depth < len(pools[j]) and len(turn) < take_defect:
                turn.append(pools[j][depth])
        depth += 1
    return {"budget": int(budget), "seed": int(seed), "keys": sorted(chosen + turn)}


def restrict(records: Sequence[SampleRecord], subset: dict[str, Any]) -> tuple[list[SampleRecord], int]:
    """(the records the subset names, in listing order; how many of its keys the listing lacks)."""
    wanted = set(subset.get("keys") or [])
    kept = [r for r in records if sample_key(r) in wanted]
    return kept, len(wanted) - len({sample_key(r) for r in kept})


def indices(records: Sequence[SampleRecord], subset: dict[str, Any]) -> list[int]:
    """Positions in `records` of the subset's samples."""
    wanted = set(subset.get("keys") or [])
    return [i for i, r in enumerate(records) if sample_key(r) in wanted]


def budget_of(value: int | None) -> int:
    """`continual.evaluation_budget` as a count: 0 (and null) mean no budget."""
    return int(value or 0)
