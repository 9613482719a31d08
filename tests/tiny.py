"""The tiny setting the store-level tests train in: 64 px synthetic classes and a small network, so an
incremental step takes seconds. `tiny_world` writes both and optionally learns a first class."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from iumad.continual.step import StepRequest, learn
from iumad.data.synth import generate_dataset
from iumad.store.db import Store

TINY: dict = {
    "backbone": {"input_size": 64},
    "model": {"dim": 32, "bottleneck": 16, "depth": 1, "heads": 2},
    "train": {"epochs": 1, "batch_size": 4},
    "score": {"bank_size": 64, "sigma": 1.0},
    "continual": {"exemplar_budget": 3, "holdout": 3},
}


def tiny_config(path: Path, **sections: dict) -> Path:
    """Write TINY, with `sections` merged into its sections (e.g. train={"epochs": 2}), as YAML."""
    cfg = copy.deepcopy(TINY)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_data(path: Path, *, seed: int, n_classes: int = 3, n_train: int = 6, n_val: int = 3,
              n_test: int = 4) -> Path:
    """Synthetic classes at 64 px (bolt, disc, ring, ... in alphabetical order)."""
    generate_dataset(path, n_classes=n_classes, seed=seed, size=64, n_train=n_train, n_val=n_val,
                     n_test=n_test, workers=1)
    return path


def tiny_world(folder: Path, *, seed: int, learned: tuple[str, ...] = ("bolt",), **sections: dict
               ) -> tuple[Path, Path, Path]:
    """(data, config, store root) under `folder`, the store having learned `learned` one by one."""
    data = tiny_data(folder / "synth", seed=seed)
    config = tiny_config(folder / "tiny.yaml", **sections)
    root = folder / "store"
    with Store.open(root) as store:
        for name in learned:
            learn(store, StepRequest(name, data, config=config))
    return data, config, root
