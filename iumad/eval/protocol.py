"""Incremental protocols (`iumad benchmark`): learn a dataset's classes in the steps a protocol names,
with one of four methods, through the same code path as `iumad add-class`, in a fresh store.

Protocol grammar (the notation of IUF / IB-IUMAD), classes taken in alphabetical order unless listed:

    spec  := term ("-" term)*
    term  := K            one step that learns K classes (K >= 1; a later term may be 0: no step)
           | SxN          N steps of S classes each (S, N >= 1)

    "10-0" -> [10]            (all classes at once)
    "9-1"  -> [9, 1]          "6-4" -> [6, 4]
    "6-1x4" -> [6, 1, 1, 1, 1]   "1x10" -> [1] * 10   "B-SxN" -> [B] + [S] * N

The step sizes must add up to the number of classes.

Methods (`METHODS`, overrides in `method_config`):
- `iumad`: the configuration as given (replay of old classes' exemplars + distillation);
- `finetune`: the sequential lower bound: the network trained on each step's classes only, with
  nothing that protects old classes: no replay, no distillation and none of the frozen per-class
  memories (no retrieval branch; the class is predicted by the learned text classifier, not by
  the frozen prototypes);
- `joint`: the configuration as given, all classes learned in one step: the upper bound;
- `memory-bank`: PatchCore-style per-class memory banks of the same frozen features; no network
  training, no reconstruction score, a sample's class is that of its nearest class memory.

Every method sets `continual.threshold_from = "normals"`: thresholds come only from held-out normal
training/validation data. The harness reads the test split only to measure R, never to train, select
exemplars, calibrate or choose a threshold.
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from iumad.errors import UsageError
from iumad.progress import ProgressFn, no_progress

METHODS = ("iumad", "finetune", "joint", "memory-bank")
MODALITY_CHOICES = ("rgb", "geometry", "both")
PROTOCOL_METRICS = ("i_auroc", "p_auroc", "aupro", "i_auroc_given", "p_auroc_given", "aupro_given",
                    "class_accuracy")
PLOTTED = ("i_auroc", "aupro")
MARKER = ".iumad-protocol"  # written into every store this module creates (and only those are deleted)
CONFIG_FILE = "protocol-config.yaml"
RESULT_FILE = "protocol.json"

_TERM = re.compile(r"^(?:(\d+)[xX](\d+)|(\d+))$")


def parse_protocol(spec: str, n_classes: int) -> list[int]:
    """Step sizes of a protocol spec (grammar in the module docstring); UsageError when the spec is
    malformed or its sizes do not add up to `n_classes`."""
    text = str(spec).strip()
    sizes: list[int] = []
    terms = text.split("-") if text else []
    if not terms:
        raise UsageError(f"--protocol {spec!r}: empty; use e.g. 10-0, 9-1, 6-1x4 or 1x10")
    for i, term in enumerate(terms):
        m = _TERM.match(term.strip())
        if m is None:
            raise UsageError(f"--protocol {spec!r}: cannot read {term!r}; a step is K classes or SxN "
                             "(N steps of S classes), joined by '-', e.g. 10-0, 9-1, 6-1x4, 1x10")
        if m.group(3) is not None:
            k = int(m.group(3))
            if k == 0 and i == 0:
                raise UsageError(f"--protocol {spec!r}: the first step must learn at least one class")
            if k:
                sizes.append(k)
        else:
            s, n = int(m.group(1)), int(m.group(2))
            if s < 1 or n < 1:
                raise UsageError(f"--protocol {spec!r}: in {term!r} both the step size and the number of "
                                 "steps must be at least 1")
            sizes += [s] * n
    if sum(sizes) != n_classes:
        raise UsageError(f"--protocol {spec!r}: its steps learn {sum(sizes)} classes ({'+'.join(map(str, sizes))})"
                         f" but there are {n_classes} classes; choose a protocol that adds up to {n_classes}"
                         " or select classes with --classes")
    return sizes


def apply_overrides(cfg: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `cfg` (a config as nested dicts) with {"section.key": value} overrides set."""
    cfg = copy.deepcopy(cfg)
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        cfg.setdefault(section, {})[key] = value
    return cfg


METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "iumad": {},
    "finetune": {"continual.replay": False, "continual.distill": False, "score.retrieval": False,
                 "score.class_by": "classifier"},
    "joint": {},
    "memory-bank": {"train.epochs": 0, "score.learned": False, "score.class_by": "memory",
                    "continual.replay": False, "continual.distill": False},
}
COMMON_OVERRIDES: dict[str, Any] = {"continual.threshold_from": "normals"}


def method_config(method: str, base: dict[str, Any]) -> dict[str, Any]:
    """`base` (a config as nested dicts) with the method's overrides; `base` itself is not changed."""
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    return apply_overrides(base, {**METHOD_OVERRIDES[method], **COMMON_OVERRIDES})


def _modalities(modalities: str) -> tuple[str, ...] | None:
    if modalities not in MODALITY_CHOICES:
        raise UsageError(f"--modalities {modalities!r}: use one of {', '.join(MODALITY_CHOICES)}")
    return None if modalities == "both" else (modalities,)


def _tree_bytes(root: Path, skip: Sequence[Path] = ()) -> int:
    """Bytes of the regular files under `root`, not following symlinks, leaving out `skip` folders."""
    total = 0
    skipped = {os.path.abspath(p) for p in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.abspath(os.path.join(dirpath, d)) not in skipped]
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                try:
                    total += os.stat(p).st_size
                except OSError:
                    pass
    return total


def _fresh_store_dir(store_dir: Path) -> None:
    """Make `store_dir` an empty folder; delete it first only if this module created it."""
    if store_dir.is_symlink() or (store_dir.exists() and not store_dir.is_dir()):
        raise UsageError(f"{store_dir}: exists and is not a folder made by iumad benchmark; choose another --out")
    if store_dir.is_dir() and any(store_dir.iterdir()):
        if not (store_dir / MARKER).is_file():
            raise UsageError(f"{store_dir}: exists, is not empty and was not made by iumad benchmark; "
                             "choose another --out")
        shutil.rmtree(store_dir)  # symlinks inside (a shared feature cache) are unlinked, not followed
    store_dir.mkdir(parents=True, exist_ok=True)
    (store_dir / MARKER).write_text("made by iumad benchmark (iumad.eval.protocol); deleted by its next run\n")


def _steps_data(data: Path, sources: dict[str, Any], names: Sequence[str], view: Path) -> Path:
    """A folder whose sub-folder `<name>` is each class (what a multi-class step reads): `data` itself when
    its class folders are named like their classes, else a folder of symlinks under `view`."""
    if all(Path(sources[n].path) == Path(data) / n for n in names):
        return Path(data)
    view.mkdir(parents=True, exist_ok=True)
    for n in names:
        link = view / n
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise UsageError(f"{link}: exists and is not a link made by iumad benchmark; choose another --out")
        link.symlink_to(Path(sources[n].path).resolve(), target_is_directory=True)
    return view


def run_protocol(data: Path, protocol: str, method: str = "iumad", modalities: str = "both",
                 classes: Sequence[str] | None = None, seed: int = 0, out: Path = Path("out/benchmark"),
                 config: Path | None = None, progress: ProgressFn = no_progress,
                 cache: Path | None = None) -> dict[str, Any]:
    """Learn the classes under `data` in the protocol's steps with `method` in a fresh store `out/store`;
    write `out/protocol.json` (returned), the merged config and plots of R for I-AUROC and AUPRO.

    `classes`: the classes and their order (default: every class under `data`, alphabetical).
    `cache`: an existing feature-cache folder to share across runs (linked as the store's features/).
    Peak RSS is that of the whole process so far (several runs in one process share it)."""
    from iumad.config import from_dict, load_config
    from iumad.continual.classdata import list_class
    from iumad.continual.report import forgetting
    from iumad.continual.step import StepRequest, learn
    from iumad.data.dataset import find_classes
    from iumad.eval.forgetting import plot, to_dict
    from iumad.store import repository as repo
    from iumad.store.atomic import atomic_write_bytes
    from iumad.store.db import DB_FILE, Store
    from sqlalchemy.engine import URL

    if method not in METHODS:
        raise UsageError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    mods = _modalities(modalities)
    data, out = Path(data), Path(out)
    sources = {s.name: s for s in find_classes(data)}
    if classes is None:
        names = sorted(sources)
    else:
        names = [str(c).strip() for c in classes if str(c).strip()]
        if not names:
            raise UsageError("--classes: name at least one class (or leave the option out for all of them)")
        unknown = [n for n in names if n not in sources]
        if unknown:
            raise UsageError(f"--classes: {', '.join(unknown)} not found under {data} "
                             f"(it holds {', '.join(sorted(sources))})")
        if len(set(names)) != len(names):
            raise UsageError(f"--classes {','.join(names)}: give each class once")
    sizes = parse_protocol(protocol, len(names))
    run_sizes = [len(names)] if method == "joint" else sizes
    chunks, start = [], 0
    for k in run_sizes:
        chunks.append(names[start:start + k])
        start += k

    for name in names:  # each class listed and checked (layout, splits, masks) before anything is written
        list_class(name, Path(sources[name].path))

    merged = method_config(method, load_config(config).to_dict())
    merged["train"]["seed"] = int(seed)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / CONFIG_FILE
    atomic_write_bytes(cfg_path, yaml.safe_dump(merged, sort_keys=False).encode())
    from_dict(merged, str(cfg_path))  # refuse a bad combination before any store is touched

    store_dir = out / "store"
    _fresh_store_dir(store_dir)
    if cache is not None:
        cache = Path(cache).resolve()
        cache.mkdir(parents=True, exist_ok=True)
        (store_dir / "features").symlink_to(cache, target_is_directory=True)
    step_data = data  # what a multi-class step reads: a folder with one sub-folder <name> per class
    together = [n for c in chunks if len(c) > 1 for n in c]
    if together:
        step_data = _steps_data(data, sources, together, out / ".protocol-classes")
    url = URL.create("sqlite", database=str((store_dir / DB_FILE).resolve())).render_as_string()

    stage = f"protocol {protocol} ({method}, {modalities})"
    steps: list[dict[str, Any]] = []
    started = time.perf_counter()
    progress(stage, 0, len(chunks))
    with Store.open(store_dir, url=url) as store:  # always the store's own SQLite file, never $IUMAD_DB_URL
        for i, chunk in enumerate(chunks):
            if len(chunk) > 1:
                req = StepRequest(tuple(chunk), step_data, modalities=mods, config=cfg_path)
            else:
                req = StepRequest(chunk[0], Path(sources[chunk[0]].path), modalities=mods, config=cfg_path)
            t0 = time.perf_counter()
            summary = learn(store, req, progress=progress)
            steps.append({"step": summary["step"], "classes": list(chunk),
                          "seconds": round(time.perf_counter() - t0, 2), "n_train": summary["n_train"],
                          "n_replay": summary["n_replay"], "model_bytes": summary["size_bytes"],
                          "model_version": summary["model_version"]})
            progress(stage, i + 1, len(chunks), f"{','.join(chunk)} {steps[-1]['seconds']:.0f} s")
        reports = {m: to_dict(forgetting(store, m)[0]) for m in PROTOCOL_METRICS}
        with store.session() as s:
            prod = repo.get_production(s)
            thresholds = {n: {"value": t.value, "method": t.method}
                          for n, t in (repo.thresholds_for(s, prod.id) if prod else {}).items()}
            used = {c.name: list(c.modalities) for c in repo.list_classes(s)}
    plots = {}
    for m in PLOTTED:
        plots[m] = str(out / f"{m}.png")
        plot(_report_from_dict(reports[m]), Path(plots[m]))
    features = store_dir / "features"
    result = {
        "protocol": protocol, "method": method, "modalities": modalities, "seed": int(seed),
        "data": str(data), "classes": names, "protocol_steps": sizes,
        "steps_run": [len(c) for c in chunks], "class_modalities": used,
        "config_file": str(cfg_path), "config": merged,
        "steps": steps, "total_seconds": round(time.perf_counter() - started, 2),
        "summary": {m: {"final_average": r["final_average"], "FM": r["FM"], "BWT": r["BWT"]}
                    for m, r in reports.items()},
        "reports": reports, "thresholds": thresholds,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_bytes": steps[-1]["model_bytes"] if steps else None,
        "store_bytes": _tree_bytes(store_dir, skip=[features]),
        "feature_cache_bytes": _tree_bytes(features.resolve()) if features.exists() else 0,
        "feature_cache_shared": cache is not None,
        "store": str(store_dir), "plots": plots, "json": str(out / RESULT_FILE),
    }
    atomic_write_bytes(out / RESULT_FILE, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _report_from_dict(d: dict[str, Any]):
    from iumad.eval.forgetting import forgetting_report

    return forgetting_report(d["step_indices"], d["class_names"], d["R"], d["metric"])


def summary_text(result: dict[str, Any]) -> str:
    """A short fixed-width table of final averages, FM and BWT (percent) for the CLI."""
    model = f", model {result['model_bytes'] / 1e6:.1f} MB" if result.get("model_bytes") else ""
    lines = [f"protocol {result['protocol']}, method {result['method']}, modalities {result['modalities']}: "
             f"{len(result['steps'])} steps ({'+'.join(map(str, result['steps_run']))} classes), "
             f"{result['total_seconds']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB{model}",
             f"{'metric':16} {'final avg':>10} {'FM':>8} {'BWT':>8}"]

    def pct(v: Any, signed: bool = False) -> str:
        return "-" if v is None else (f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}")

    for m, s in result["summary"].items():
        lines.append(f"{m:16} {pct(s['final_average']):>10} {pct(s['FM']):>8} {pct(s['BWT'], True):>8}")
    lines.append(f"results: {result['json']}")
    return "\n".join(lines) + "\n"
