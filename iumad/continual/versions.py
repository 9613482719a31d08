"""Model versions on disk: loading the serving model, rolling back, removing what dead steps left."""

from __future__ import annotations

from typing import Any


from iumad.errors import UsageError
from iumad.model.detector import Detector
from iumad.store.checkpoints import load_detector
from iumad.store import repository as repo
from iumad.store.db import Store
from iumad.store.models import ModelVersion, Step


def load_version(store: Store, version: ModelVersion) -> Detector:
    """A recorded model version, refused unless model.pt matches the sha256 in the store."""
    return load_detector(store.path(version.checkpoint_dir), expected_sha256=version.sha256,
                         cache_dir=store.features_dir)


def load_production(store: Store) -> tuple[Detector, ModelVersion]:
    """The serving model, or a UsageError when no class has been learned yet."""
    with store.session() as s:
        version = repo.get_production(s)
    if version is None:
        raise UsageError(f"{store.where}: no production model yet; learn a class with `iumad add-class`")
    return load_version(store, version), version


def rollback(store: Store, to: int | None = None, wait: float = 0.0) -> dict[str, Any]:
    """Move the production alias to version `to` (default: the version production was trained from),
    after checking that its checkpoint loads; recorded as a `rollback` step."""
    with store.writer_lock(wait):
        with store.session() as s:
            repo.fail_stale_steps(s)
            current = repo.get_production(s)
            if current is None:
                raise UsageError("nothing to roll back: there is no production model")
            if to is None:
                made_by = s.get(Step, current.step_id) if current.step_id else None
                to = made_by.parent_version_id if made_by else None
                if to is None:
                    raise UsageError(f"version {current.id} is the first model; there is nothing before it "
                                     "(pass --to VERSION)")
            target = s.get(ModelVersion, to)
            if target is None:
                raise UsageError(f"model version {to} does not exist; see `iumad history`")
            if target.id == current.id:
                raise UsageError(f"version {to} is already production")
            if target.removed_at is not None:
                raise UsageError(f"model version {to}'s files were removed by `iumad gc` on "
                                 f"{target.removed_at:%Y-%m-%d}; roll back to a kept one (`iumad pin` keeps one)",
                                 fix="choose a version that gc kept")
        store.remove_unfinished_checkpoints()
        det = load_version(store, target)  # refuses a missing or tampered checkpoint before anything changes
        with store.session() as s:
            step = repo.begin_step(s, "rollback", det.class_names, parent_version_id=current.id,
                                   config_hash=det.config.hash(), seed=det.config.train.seed)
            repo.promote(s, target.id)
            repo.finish_step(s, step, succeeded=True, result_version_id=target.id)
    return {"step": step.step_index, "from_version": current.id, "to_version": target.id,
            "classes": det.class_names}
