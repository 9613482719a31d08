"""Quarantine review: list the samples `nightly` held back and record a person's accept or reject.

One module for every front end (the `iumad quarantine` commands, the service's /v1/quarantine routes
and its dashboard), so they all see and write the same rows. A decision needs no writer lock: it is one
row, final, and the UNIQUE sample id makes two racing deciders end with one; `nightly` reads the
accepted ones when it starts and marks them learned in the step that learns them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from iumad.data.sample import SampleRecord
from iumad.errors import DataError
from iumad.store import repository as repo
from iumad.store.db import Store
from iumad.store.models import QuarantineDecision, QuarantinedSample


def sample_row(sample: QuarantinedSample, decision: QuarantineDecision | None,
               step_indices: dict[int, int]) -> dict[str, Any]:
    """The JSON row of one sample (what `iumad quarantine list --json` and GET /v1/quarantine give);
    `step_indices` maps step ids to the step numbers the rows show."""
    learned = decision.learned_step_id if decision else None
    return {"id": sample.id, "class": sample.class_name, "step": step_indices.get(sample.step_id),
            "source": sample.source,
            "files": {k: sample.files.get(k) for k in ("rgb", "geometry")}, "score": sample.score,
            "z": sample.z, "quarantined_at": sample.quarantined_at.isoformat(),
            "decision": decision.decision if decision else None,
            "decided_at": decision.decided_at.isoformat() if decision else None,
            "decided_by": decision.decided_by if decision else None,
            "learned_step": None if learned is None else step_indices.get(learned)}


def list_samples(store: Store, *, class_name: str | None = None, undecided: bool = False) -> list[dict[str, Any]]:
    """Every quarantined sample (oldest first) with its decision; step numbers are step indices."""
    with store.session() as s:
        index = {st.id: st.step_index for st in repo.list_steps(s)}
        return [sample_row(sample, decision, index)
                for sample, decision in repo.list_quarantined(s, class_name=class_name, undecided=undecided)]


def get_sample(store: Store, sample_id: int) -> dict[str, Any]:
    """One sample's row; UnknownSample (exit 2, HTTP 404) when there is none."""
    with store.session() as s:
        sample, decision = repo.get_quarantined(s, sample_id)
        index = {st.id: st.step_index for st in repo.list_steps(s)}
        return sample_row(sample, decision, index)


def decide(store: Store, sample_id: int, decision: str, *, decided_by: str | None = None) -> dict[str, Any]:
    """Record `accept` or `reject`; returns the sample's row plus `created` (False when the same decision
    was already there). The other decision on a decided sample is a DecisionConflict; nothing changes."""
    try:
        with store.session() as s:
            _, created = repo.decide_quarantined(s, sample_id, decision, decided_by=decided_by)
    except IntegrityError:  # another decider won the race: answer as if we came second
        with store.session() as s:
            _, created = repo.decide_quarantined(s, sample_id, decision, decided_by=decided_by)
    return get_sample(store, sample_id) | {"created": created}


def files_of(record: SampleRecord, folder: str, shas: dict[str, str]) -> dict[str, Any]:
    """What `QuarantinedSample.files` keeps of a record whose files move into the store-relative `folder`.
    Each file's name there starts with its content's sha256 (`shas`: modality -> digest), so files of the
    same name (from two sub-folders, the rgb and depth of one sample, or two runs that refused a whole
    delivery into quarantine/unlearned/) never overwrite each other."""
    def place(m: str, path: Path | None) -> str | None:
        return None if path is None else f"{folder}/{shas[m][:12]}-{path.name}"

    return {"rgb": place("rgb", record.rgb), "geometry": place("geometry", record.geometry),
            "geometry_kind": record.geometry_kind,
            "depth_range": None if record.depth_range is None else list(record.depth_range)}


def sample_record(store: Store, sample: QuarantinedSample) -> SampleRecord:
    """The sample's files where they lie now (under <store>/quarantine/), as a record the readers take;
    DataError naming the file when one is gone."""
    files = sample.files
    paths = {k: None if files.get(k) is None else store.path(files[k]) for k in ("rgb", "geometry")}
    for path in paths.values():
        if path is not None and not path.is_file():
            raise DataError(f"{path}: quarantined sample {sample.id}'s file is gone; it cannot be shown or learned",
                            file=path, fix="restore it from a backup of the store's quarantine/ folder")
    depth_range = files.get("depth_range")
    return SampleRecord(sample.class_name, "train", "good", rgb=paths["rgb"], geometry=paths["geometry"],
                        geometry_kind=files.get("geometry_kind") if paths["geometry"] is not None else None,
                        depth_range=None if depth_range is None else (float(depth_range[0]), float(depth_range[1])))


def record_of(store: Store, sample_id: int) -> tuple[str, SampleRecord]:
    """(class name, record) of one quarantined sample, for an overlay computed on demand."""
    with store.session() as s:
        sample, _ = repo.get_quarantined(s, sample_id)
        return sample.class_name, sample_record(store, sample)
