"""Multipart uploads -> validated `SampleRecord`s in a temporary folder.

Uploaded bytes are written only under a folder the caller creates with `tempfile` and removes after
scoring, under names the server picks (never the client's file name). Every file is decoded once here
through the project's guarded readers (`iumad.data.loading.load_sample`), so a bad upload is refused
with 400/415 naming its field before the model sees it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.datastructures import FormData, UploadFile

from iumad.data.loading import load_sample
from iumad.data.sample import Sample, SampleRecord
from iumad.errors import DataError
from iumad.serve.errors import ApiError

MAX_BATCH = 64
"""Samples one batch request may hold (predict_path's chunk: bounds the maps held at once)."""


@dataclass(frozen=True)
class FieldKind:
    """What one file field holds: accepted content types and the magic bytes that prove them."""

    suffix: str
    content_types: tuple[str, ...]
    magics: tuple[bytes, ...]
    describes: str


PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff"
TIFF = (b"II*\x00", b"MM\x00*")
GENERIC = ("application/octet-stream", "")  # clients that do not say: the magic bytes decide
KINDS: dict[str, FieldKind] = {
    "rgb": FieldKind(".png", ("image/png", "image/jpeg", "image/jpg"), (PNG, JPEG), "an 8-bit PNG or JPEG colour image"),
    "xyz": FieldKind(".tiff", ("image/tiff", "image/tif"), TIFF, "an HxWx3 float TIFF of xyz points"),
    "depth": FieldKind("_depth.png", ("image/png",), (PNG,), "a 16-bit single-channel PNG of depth in mm"),
}
BATCH_FIELD = re.compile(r"^(rgb|xyz|depth)\.(\d{1,3})$")


@dataclass
class Upload:
    """One sample's files as sent: field name (as the client wrote it, e.g. `rgb.3`) -> bytes."""

    files: dict[str, tuple[str, bytes]]  # kind ("rgb", "xyz", "depth") -> (field name, bytes)


HEATMAP_VALUES = {"true": "url", "1": "url", "yes": "url", "url": "url", "base64": "base64",
                  "false": None, "0": None, "no": None, "": None}
TEXT_FIELDS = ("class", "heatmap")


def heatmap_of(form: FormData) -> str | None:
    """The `heatmap` field: None (no overlay, the default), "url" (true: a /v1/maps/ URL) or "base64"."""
    value = form.get("heatmap")
    if isinstance(value, UploadFile):
        raise ApiError(400, "field 'heatmap' must be a text field, not a file", field="heatmap",
                       fix="send heatmap=true, heatmap=base64 or leave it out")
    key = (value or "").strip().lower()
    if key not in HEATMAP_VALUES:
        raise ApiError(400, f"field 'heatmap' is {value!r}; it takes true, false or base64", field="heatmap",
                       fix="send heatmap=true (a /v1/maps/ URL), heatmap=base64 (the PNG inline) or leave it out")
    return HEATMAP_VALUES[key]


def class_of(form: FormData) -> str | None:
    """The `class` field: a class name, or None for `auto` / absent (the model predicts the class)."""
    value = form.get("class")
    if isinstance(value, UploadFile):
        raise ApiError(400, "field 'class' must be a text field, not a file", field="class",
                       fix="send class=<name> or class=auto")
    value = (value or "auto").strip()
    return None if value in ("", "auto") else value


async def collect(form: FormData, *, batch: bool) -> list[Upload]:
    """The samples a form holds: fields rgb/xyz/depth (one sample), or rgb.N/xyz.N/depth.N (batch)."""
    samples: dict[int, Upload] = {}
    for name, value in form.multi_items():
        if name in TEXT_FIELDS:
            continue
        index, kind = _parse_name(name, batch)
        if not isinstance(value, UploadFile):
            raise ApiError(400, f"field {name!r} must be a file upload, not text", field=name,
                           fix=f"send {KINDS[kind].describes} as a multipart file")
        sample = samples.setdefault(index, Upload({}))
        if kind in sample.files:
            raise ApiError(400, f"field {name!r} is sent twice", field=name, fix="send each file field once")
        data = await value.read()
        _check_type(name, kind, value.content_type, data)
        sample.files[kind] = (name, data)
    if not samples:
        fields = "rgb.N, xyz.N or depth.N" if batch else "rgb, xyz or depth"
        raise ApiError(400, f"no image in the request; send {fields} as multipart files",
                       field="rgb.0" if batch else "rgb", fix=f"add a file field {fields}")
    if batch and sorted(samples) != list(range(len(samples))):
        missing = min(set(range(max(samples) + 1)) - set(samples))
        raise ApiError(400, f"batch sample {missing} is missing (indices must run 0, 1, 2, ...)",
                       field=f"rgb.{missing}", fix="number the samples 0, 1, 2, ... without gaps")
    if len(samples) > MAX_BATCH:
        raise ApiError(413, f"{len(samples)} samples in one batch; the limit is {MAX_BATCH}", field=None,
                       fix=f"split the batch into requests of at most {MAX_BATCH} samples")
    out = [samples[i] for i in sorted(samples)]
    for i, sample in enumerate(out):
        if "xyz" in sample.files and "depth" in sample.files:
            name = sample.files["depth"][0]
            raise ApiError(400, f"sample {i} has both xyz and depth geometry; send one of them", field=name,
                           fix="send either xyz (TIFF) or depth (16-bit PNG), not both")
    return out


def _parse_name(name: str, batch: bool) -> tuple[int, str]:
    if not batch:
        if name in KINDS:
            return 0, name
        raise ApiError(400, f"unknown field {name!r}; /v1/predict takes rgb, xyz, depth, class and heatmap", field=name,
                       fix="rename the field to rgb, xyz or depth (batches go to /v1/predict/batch)")
    match = BATCH_FIELD.match(name)
    if match is None:
        raise ApiError(400, f"unknown field {name!r}; /v1/predict/batch takes rgb.N, xyz.N, depth.N, class and "
                       "heatmap",
                       field=name, fix="name the files rgb.0, xyz.0, rgb.1, ... (one index per sample)")
    return int(match.group(2)), match.group(1)


def _check_type(name: str, kind: str, content_type: str | None, data: bytes) -> None:
    """415 when the declared type or the file's magic bytes are not what the field takes."""
    spec = KINDS[kind]
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared not in spec.content_types + GENERIC:
        raise ApiError(415, f"field {name!r} is declared {declared!r}; it takes {spec.describes}", field=name,
                       fix=f"send {spec.describes} with content type {spec.content_types[0]}")
    if not data:
        raise ApiError(400, f"field {name!r} is empty", field=name, fix=f"send {spec.describes}")
    if not data.startswith(spec.magics):
        raise ApiError(415, f"field {name!r} does not hold {spec.describes} (its first bytes are no "
                       f"{'/'.join(t.split('/')[1].upper() for t in spec.content_types[:2])} signature)",
                       field=name, fix=f"send {spec.describes}")


def write_records(samples: list[Upload], folder: Path, size: int | None = None
                  ) -> tuple[list[SampleRecord], list[Sample]]:
    """Write each sample's files into `folder` under server-chosen names and check that they decode
    (the readers' guards: header sizes, truncation, TIFF shape, NaN-only points, rgb/geometry sizes);
    returns the records and what was read (at `size`, the model's input, or as sent), so that scoring
    does not read the files again."""
    records, loaded = [], []
    for i, sample in enumerate(samples):
        paths: dict[str, Path] = {}
        names: dict[Path, str] = {}
        for kind, (name, data) in sample.files.items():
            suffix = ".jpg" if kind == "rgb" and data.startswith(JPEG) else KINDS[kind].suffix
            path = folder / f"{i}{suffix}"
            path.write_bytes(data)
            paths[kind], names[path] = path, name
        geometry = paths.get("xyz", paths.get("depth"))
        record = SampleRecord("", "test", "unknown", rgb=paths.get("rgb"), geometry=geometry,
                              geometry_kind=None if geometry is None else ("xyz" if "xyz" in paths else "depth"))
        try:
            loaded.append(load_sample(record, size))
        except DataError as exc:
            raise data_error(exc, names) from None
        records.append(record)
    return records, loaded


def data_error(exc: DataError, names: dict[Path, str]) -> ApiError:
    """A reader's DataError as a 400 naming the form field instead of the temporary file."""
    message, field = str(exc), None
    for path, name in names.items():
        if str(path) in message or exc.file == str(path):
            field = field or name
        for written in (f"'{path}'", str(path), path.name):
            message = message.replace(written, f"field {name!r}")
    kind = KINDS.get((field or "").split(".")[0])
    return ApiError(400, message, field=field,
                    fix=exc.fix or (f"send {kind.describes}" if kind else "send readable files of the documented kinds"))


def as_row(record: dict[str, Any]) -> dict[str, Any]:
    """A `prediction_rows` row without its temporary path."""
    return {k: v for k, v in record.items() if k != "path"}
