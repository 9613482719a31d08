"""Everything a step reads about one class, read (and checked) before the store changes at all."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from iumad.continual.exemplars import record_to_json, split_holdout
from iumad.data.dataset import ClassSource, find_classes, layout_of, require_records
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
    evaluation_root: Path | None = None
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


def class_source(name: str, data: Path) -> ClassSource:
    """The class folder under `data`: `data` itself, or its sub-folder called `name`."""
    sources = find_classes(Path(data))
    if len(sources) == 1:
        return sources[0]
    match = [s for s in sources if s.name == name]
    if not match:
        raise UsageError(f"{data}: holds {len(sources)} classes ({', '.join(s.name for s in sources)}) and "
                         f"none is called {name!r}; point --data at the class folder")
    return match[0]


def read_class(name: str, data: Path, *, test: Path | None, modalities: Sequence[str] | None,
               holdout: int, extractor: FeatureExtractor, progress: ProgressFn,
               train_records: Sequence[SampleRecord] | None = None) -> ClassData:
    """List, validate and featurise a class's data; any bad file raises DataError before a step starts.

    Training data is the class's train split; held-out normals its validation split (or every fifth
    training sample); the evaluation set is `test` (a class folder, its test split) or the test split.
    `train_records` (nightly: the newly delivered files) replaces the train split."""
    if train_records is not None:
        source = ClassSource(name, Path(data), layout_of(Path(data)) or "folder")
        train = list(train_records)
    else:
        source = class_source(name, data)
        train = require_records(source, "train")
    wanted = tuple(modalities) if modalities else tuple(m for m in MODALITIES if any(m in r.modalities
                                                                                     for r in train))
    for r in train:
        missing = [m for m in wanted if m not in r.modalities]
        if missing:
            raise DataError(f"{r.rgb or r.geometry}: has no {'/'.join(missing)} file while the class uses "
                            f"{', '.join(wanted)}; add it or pass --modalities {','.join(r.modalities)}")
    validation = source.records("validation") if train_records is None else []
    train, held = split_holdout(train, validation, holdout)
    eval_source = class_source(name, test) if test is not None else source
    evaluation = eval_source.records("test")
    if test is not None and not evaluation:
        raise DataError(f"{test}: its test split holds no sample; give a labelled evaluation set")
    cd = ClassData(name, source.path, wanted, train, held, evaluation,
                   eval_source.path if evaluation else None)
    for r in evaluation:  # masks are read now: a bad one must stop the step before it starts
        read_gt(r, record_size(r))
    cd.train_features = extractor.extract(train, wanted, progress, stage=f"features {name}")
    cd.holdout_features = extractor.extract(held, wanted, progress, stage=f"features {name} (held out)")
    extractor.extract(evaluation, wanted, progress, stage=f"features {name} (evaluation)")
    return cd
