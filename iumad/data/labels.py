"""What an evaluation set's labels can measure, decided before anything is learned.

Pixel masks measure everything (I-AUROC, P-AUROC, AUPRO). A plant often knows only which parts were
bad: with image-level labels I-AUROC and thresholds are measured, the pixel metrics are not (recorded as
not measured, never as 0). Either every defect sample of a class has masks or none has: a class where only
some lack one is refused, since its pixel metrics would silently cover a subset. `image_labels=True`
(`--image-labels`) evaluates on image labels whatever masks exist.

An evaluation set with defects but no normal sample cannot measure I-AUROC or choose a threshold; it is
refused too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

from iumad.data.sample import SampleRecord
from iumad.errors import DataError

LabelLevel = Literal["pixel", "image"]
NOT_MEASURED = "not measured: image-level labels only (no pixel masks)"


def label_level(records: Sequence[SampleRecord], image_labels: bool = False) -> LabelLevel | None:
    """'pixel' when every defect sample has a mask, 'image' when none has (or `image_labels`), None
    without defect samples; DataError naming the first sample without a mask when only some lack one."""
    defects = [r for r in records if r.label != "good"]
    if not defects:
        return None
    if image_labels:
        return "image"
    bare = [r for r in defects if r.gt is None]
    if not bare:
        return "pixel"
    if len(bare) == len(defects):
        return "image"
    first = bare[0].rgb or bare[0].geometry
    raise DataError(f"{first}: defective test sample without a gt mask while {len(defects) - len(bare)} of the "
                    f"class's {len(defects)} defect samples have one; add its mask, or pass --image-labels to "
                    "evaluate on image-level labels only", file=first,
                    fix="add its mask, or pass --image-labels")


def check_evaluation_set(records: Sequence[SampleRecord], where: Path,
                         image_labels: bool = False) -> LabelLevel | None:
    """The set's label level (see `label_level`), after refusing defects without any normal sample."""
    if any(r.label != "good" for r in records) and not any(r.label == "good" for r in records):
        raise DataError(f"{where}: the test split holds defect samples but no normal one, so neither I-AUROC nor "
                        "a threshold can be measured; add normal test images (test/good/ in the MVTec layouts), "
                        "give a labelled set with --test, or use --normal/--abnormal with --normal-test",
                        file=where, fix="add normal test images, or use --normal/--abnormal with --normal-test")
    return label_level(records, image_labels)
