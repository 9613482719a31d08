"""Everything a step reads about one class, read (and checked) before the store changes at all."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from iumad.continual.exemplars import record_to_json, split_holdout
from iumad.data import described
from iumad.data.dataset import LAYOUTS, ClassSource, described_source, find_classes, layout_of, require_records
from iumad.data.described import FolderSpec
from iumad.data.labels import LabelLevel, check_evaluation_set
from iumad.data.sample import SampleRecord
from iumad.errors import DataError, UsageError
from iumad.data.loading import read_gt, record_size
from iumad.model.features import MODALITIES, FeatureExtractor, SampleFeatures
from iumad.progress import ProgressFn


@dataclass
class ClassData:
    """A class's records and their frozen features: training, held-out normals, evaluation."""

    name: str
    root: Path
    modalities: tuple[str, ...]
    train: list[SampleRecord]
    holdout: list[SampleRecord]
    evaluation: list[SampleRecord] = field(default_factory=list)
    evaluation_locator: str | None = None  # where the store finds the evaluation set again
    labels: LabelLevel | None = None  # what the evaluation set's defect samples are labelled with
    train_features: list[SampleFeatures] = field(default_factory=list)
    holdout_features: list[SampleFeatures] = field(default_factory=list)

    @property
    def has_defects(self) -> bool:
        return any(r.label != "good" for r in self.evaluation)

    def fingerprint(self) -> str:
        """sha256 over the training files' contents, to tell later whether the data changed."""
        digests = sorted(f["sha256"] for r in self.train + self.holdout
                         for f in record_to_json(r)["files"].values())
        return hashlib.sha256(json.dumps(digests).encode()).hexdigest()


def class_source(name: str, data: Path | str) -> ClassSource:
    """The class folder under `data`: `data` itself, or its sub-folder called `name`. `data` may also be
    a stored folder description (`ClassSource.locator` of a class given by --normal/--abnormal)."""
    if isinstance(data, str) and described.is_locator(data):
        return described_source(name, described.decode(data))
    sources = find_classes(Path(data))
    if len(sources) == 1:
        return sources[0]
    match = [s for s in sources if s.name == name]
    if not match:
        raise UsageError(f"{data}: holds {len(sources)} classes ({', '.join(s.name for s in sources)}) and "
                         f"none is called {name!r}; point --data at the class folder")
    return match[0]


@dataclass
class ClassListing:
    """A class's samples as listed (no pixel read yet), checked: its training split is not empty and its
    evaluation set can measure what it claims (`labels`)."""

    source: ClassSource
    train: list[SampleRecord]
    validation: list[SampleRecord]
    eval_source: ClassSource
    evaluation: list[SampleRecord]
    labels: LabelLevel | None


def list_class(name: str, data: Path, *, test: Path | None = None, folders: FolderSpec | None = None,
               image_labels: bool = False, train_records: Sequence[SampleRecord] | None = None) -> ClassListing:
    """List and check a class without reading pixels, so that a command can refuse bad data before it
    creates anything. `folders` (--normal/--abnormal/...) replaces `data`; `train_records` (nightly: the
    newly delivered files) replaces the train split."""
    if train_records is not None:
        source = ClassSource(name, Path(data), layout_of(Path(data)) or "folder")
        train = list(train_records)
    else:
        source = described_source(name, folders) if folders is not None else class_source(name, data)
        train = require_records(source, "train")
    validation = source.records("validation") if train_records is None else []
    eval_source = class_source(name, test) if test is not None else source
    evaluation = eval_source.records("test")
    if test is not None and not evaluation:
        raise DataError(f"{test}: its test split holds no sample; give a labelled evaluation set", file=test,
                        fix="give a labelled evaluation set")
    labels = check_evaluation_set(evaluation, _test_dir(eval_source), image_labels)
    return ClassListing(source, train, validation, eval_source, evaluation, labels)


def _test_dir(source: ClassSource) -> Path:
    """The folder of the source's test split, to name in errors (the class folder where it has none)."""
    if source.folders is not None:
        return source.folders.abnormal or source.path
    return source.path / LAYOUTS[source.layout].split_dirs.get("test", "")


def read_class(name: str, data: Path, *, test: Path | None, modalities: Sequence[str] | None,
               holdout: int, extractor: FeatureExtractor, progress: ProgressFn,
               train_records: Sequence[SampleRecord] | None = None, folders: FolderSpec | None = None,
               image_labels: bool = False) -> ClassData:
    """List, validate and featurise a class's data; any bad file raises DataError before a step starts.

    Training data is the class's train split; held-out normals its validation split (or every fifth
    training sample); the evaluation set is `test` (a class folder, its test split) or the test split.
    `train_records` (nightly: the newly delivered files) replaces the train split."""
    listing = list_class(name, data, test=test, folders=folders, image_labels=image_labels,
                         train_records=train_records)
    source, train, evaluation = listing.source, listing.train, listing.evaluation
    wanted = tuple(modalities) if modalities else tuple(m for m in MODALITIES if any(m in r.modalities
                                                                                     for r in train))
    for r in train:
        missing = [m for m in wanted if m not in r.modalities]
        if missing:
            raise DataError(f"{r.rgb or r.geometry}: has no {'/'.join(missing)} file while the class uses "
                            f"{', '.join(wanted)}; add it or pass --modalities {','.join(r.modalities)}")
    train, held = split_holdout(train, listing.validation, holdout)
    cd = ClassData(name, source.path, wanted, train, held, evaluation,
                   listing.eval_source.locator if evaluation else None, listing.labels)
    if listing.labels == "pixel":  # masks are read now: a bad one must stop the step before it starts
        for r in evaluation:
            read_gt(r, record_size(r))
    cd.train_features = extractor.extract(train, wanted, progress, stage=f"features {name}")
    cd.holdout_features = extractor.extract(held, wanted, progress, stage=f"features {name} (held out)")
    extractor.extract(evaluation, wanted, progress, stage=f"features {name} (evaluation)")
    return cd
