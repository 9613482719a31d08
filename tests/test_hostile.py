"""Hostile input (issue #7): property-based tests over mutated files, configs, folders and class names.

Whatever comes in, only the project's own errors may come out: DataError (exit 4) for data, UsageError
(exit 2) for configs and names; never a raw ValueError, OSError, PIL/tifffile error, MemoryError or
RecursionError, never a hang, never a memory blow-up, and the store is unchanged afterwards.
`tests/hostile_counts.py` counts the cases tried; the terminal summary (conftest) prints them.
IUMAD_HOSTILE_SCALE=N multiplies every property's example count (default 1: about 30 s in all).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import re
import resource
import shutil
import signal
import sqlite3
import struct
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import tifffile
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from iumad.config import Config, load_config
from iumad.data import find_classes, load_sample
from iumad.data.io import (
    MAX_PIXELS,
    image_size,
    read_depth_png,
    read_geometry_tiff,
    read_mask,
    read_rgb,
)
from iumad.data.sample import SPLITS, SampleRecord
from iumad.errors import DataError, UsageError
from iumad.store import repository as repo
from iumad.store.db import Store
from iumad.data.described import DESCRIPTION_FILE
from tests import layouts
from tests.conftest import scene, write_png, write_tiff
from tests.hostile_counts import COUNTS

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much])
SCALE = float(os.environ.get("IUMAD_HOSTILE_SCALE", "1"))  # e.g. 20 for a deeper local run


def scaled(n: int) -> int:
    return max(1, round(n * SCALE))


MEMORY_HEADROOM = 768 << 20  # bytes a reader may map on top of what the process holds already
VALID_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}", re.ASCII)  # the rule, with fullmatch (no "\n" before $)


# ---------------------------------------------------------------------- helpers


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no reader's `except Exception` can swallow it."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def ring(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Hang as exc:  # now outside the code under test: an ordinary failure hypothesis can shrink
        raise AssertionError(f"hang: {exc}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def memory_cap(extra: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Cap the address space at its current size + `extra`: a reader that tries to allocate what a
    header declares gets MemoryError (which `no_memory_error` then finds in the exception chain)."""
    statm = Path("/proc/self/statm")
    if not statm.exists():  # not Linux: no cap, the timing check still applies
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(statm.read_text().split()[0]) * resource.getpagesize() + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def no_memory_error(exc: BaseException) -> None:
    kinds = [type(e).__name__ for e in chain(exc)]
    assert "MemoryError" not in kinds, f"the reader tried to allocate what the header declares: {kinds}"


def check_error(exc: BaseException, kind: type, names: str | None = None) -> None:
    """A project error of exactly the expected exit code, one line, naming the file when given."""
    assert isinstance(exc, kind), f"{type(exc).__name__} instead of {kind.__name__}: {exc}"
    assert exc.exit_code == {DataError: 4, UsageError: 2}[kind]
    text = str(exc)
    assert text and len(text.splitlines()) == 1, f"not one line: {text!r}"
    if names is not None:
        assert names in text, f"{text!r} does not name {names!r}"


def attempt(fn: Callable[..., Any], *args: Any, kind: type = DataError, names: str | None = None,
            **kwargs: Any) -> tuple[Any, BaseException | None]:
    """(result, None), or (None, error) for the project error `kind`; anything else propagates."""
    try:
        return fn(*args, **kwargs), None
    except kind as exc:
        check_error(exc, kind, names)
        return None, exc


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


RGB, XYZ = scene(8, seed=3)
BASE_PNG = png_bytes(RGB)
BASE_DEPTH_PNG = png_bytes(np.arange(64, dtype=np.uint16).reshape(8, 8) * 97 + 1)
BASE_TIFF = tiff_bytes(XYZ, photometric="minisblack", planarconfig="contig")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], len(PNG_SIGNATURE)
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        chunks.append((data[at + 4:at + 8], data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def png_build(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG from (type, data) chunks with correct lengths and CRCs: only the content is hostile."""
    out = [PNG_SIGNATURE]
    for kind, data in chunks:
        out.append(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))
    return b"".join(out)


@st.composite
def byte_mutations(draw: st.DrawFn, base: bytes) -> bytes:
    """Truncate, flip bits, overwrite or insert runs of random bytes, a few times over."""
    data = bytearray(base)
    ops = draw(st.lists(st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, len(base) - 1), st.none()),
        st.tuples(st.just("flip"), st.integers(0, len(base) - 1), st.integers(1, 255)),
        st.tuples(st.just("overwrite"), st.integers(0, len(base) - 1), st.binary(min_size=1, max_size=24)),
        st.tuples(st.just("insert"), st.integers(0, len(base)), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("extreme"), st.integers(0, len(base) - 1),
                  st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff",
                                   b"\xff\xff\xff\x7f", b"\x00\x00\x01\x00"])),
    ), min_size=1, max_size=6))
    for op, at, arg in ops:
        if not data and op != "insert":
            continue
        at = at % len(data) if data else 0
        if op == "truncate":
            del data[at:]
        elif op == "flip":
            data[at] ^= arg
        elif op in ("overwrite", "extreme"):
            data[at:at + len(arg)] = arg
        else:
            data[at:at] = arg
    assume(bytes(data) != base)
    return bytes(data)


@st.composite
def png_semantic_mutations(draw: st.DrawFn) -> bytes:
    """Valid chunk framing (CRCs fixed) around hostile content: odd IHDR fields, dropped, duplicated or
    reordered chunks, garbage IDAT, palettes and ancillary chunks."""
    chunks = png_chunks(BASE_PNG)
    ihdr = bytearray(chunks[0][1])
    width = draw(st.integers(1, 48) | st.sampled_from([0, 8]))
    height = draw(st.integers(1, 48) | st.sampled_from([0, 8]))
    ihdr[0:8] = struct.pack(">II", width, height)
    ihdr[8] = draw(st.sampled_from([8, 8, 1, 2, 4, 16, 0, 3, 255]))
    ihdr[9] = draw(st.sampled_from([2, 2, 0, 3, 4, 6, 1, 5, 7]))
    ihdr[10:13] = bytes([draw(st.sampled_from([0, 0, 1])), draw(st.sampled_from([0, 0, 1])),
                         draw(st.sampled_from([0, 0, 1, 2]))])
    chunks[0] = (b"IHDR", bytes(ihdr))
    extra = st.one_of(
        st.tuples(st.just(b"PLTE"), st.binary(max_size=40)),
        st.tuples(st.just(b"tRNS"), st.binary(max_size=20)),
        st.tuples(st.just(b"IDAT"), st.binary(max_size=64)),
        st.tuples(st.just(b"IDAT"), st.binary(max_size=256).map(zlib.compress)),
        st.tuples(st.sampled_from([b"iCCP", b"zTXt", b"iTXt", b"eXIf", b"gAMA", b"sBIT", b"pHYs", b"acTL",
                                   b"fcTL", b"fdAT", b"IEND", b"IHDR"]), st.binary(max_size=40)),
        st.tuples(st.binary(min_size=4, max_size=4), st.binary(max_size=16)),
    )
    for op, at, chunk in draw(st.lists(st.tuples(
            st.sampled_from(["none", "insert", "drop", "duplicate", "swap", "flip"]),
            st.integers(0, 10), extra), max_size=4)):
        at %= len(chunks) or 1
        if op == "insert":
            chunks.insert(at, chunk)
        elif op == "drop" and chunks:
            del chunks[at]
        elif op == "duplicate" and chunks:
            chunks.insert(at, chunks[at])
        elif op == "swap" and len(chunks) > 1:
            chunks[at], chunks[at - 1] = chunks[at - 1], chunks[at]
        elif op == "flip" and chunks and chunks[at][1]:
            kind, body = chunks[at]
            body = bytearray(body)
            body[draw(st.integers(0, len(body) - 1))] ^= draw(st.integers(1, 255))
            chunks[at] = (kind, bytes(body))
    data = png_build(chunks)
    assume(data != BASE_PNG)
    return data


def check_rgb(arr: np.ndarray) -> None:
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert 0 < arr.shape[0] * arr.shape[1] <= MAX_PIXELS and arr.flags.c_contiguous


def check_all_image_readers(path: Path) -> None:
    """Every PNG reader on one (possibly broken) file: a valid result or a DataError naming the file."""
    rgb, _ = attempt(read_rgb, path, names=path.name)
    if rgb is not None:
        check_rgb(rgb)
    mask, _ = attempt(read_mask, path, names=path.name)
    if mask is not None:
        assert mask.dtype == bool and mask.ndim == 2
    for depth_range in (None, (0.4, 0.9)):
        depth, _ = attempt(read_depth_png, path, depth_range, names=path.name)
        if depth is not None:
            assert depth.dtype == np.float32 and depth.ndim == 2 and np.isfinite(depth).all()
    size, _ = attempt(image_size, path, names=path.name)
    if size is not None:
        assert all(isinstance(v, int) for v in size) and len(size) == 2
    record = SampleRecord(class_name="widget", split="test", label="good", rgb=path)
    sample, _ = attempt(load_sample, record, names=path.name)
    if sample is not None:
        check_rgb(sample.rgb)
        assert sample.gt is not None and sample.gt.shape == sample.rgb.shape[:2] and not sample.gt.any()
    record = SampleRecord(class_name="widget", split="train", label="good", geometry=path, geometry_kind="depth")
    sample, _ = attempt(load_sample, record, names=path.name)
    if sample is not None:
        assert sample.geometry.dtype == np.float32 and np.isfinite(sample.geometry).all() and sample.valid.any()


def check_geometry_result(path: Path) -> tuple[np.ndarray, str] | None:
    """read_geometry_tiff, image_size and load_sample on one TIFF; returns the reader's result."""
    result, _ = attempt(read_geometry_tiff, path, names=path.name)
    if result is not None:
        geometry, kind = result
        assert geometry.dtype == np.float32 and np.isfinite(geometry).all()
        assert kind in ("xyz", "depth")
        assert geometry.ndim == (3 if kind == "xyz" else 2)
        assert kind == "depth" or geometry.shape[2] == 3
        assert 0 < geometry.shape[0] * geometry.shape[1] <= MAX_PIXELS
    size, _ = attempt(image_size, path, names=path.name)
    if size is not None:
        assert len(size) == 2 and all(isinstance(v, int) for v in size)
    record = SampleRecord(class_name="widget", split="train", label="good", geometry=path, geometry_kind="xyz")
    sample, _ = attempt(load_sample, record, names=path.name)
    if sample is not None:
        assert result is not None and result[1] == "xyz"
        assert sample.geometry.shape[2] == 3 and np.isfinite(sample.geometry).all() and sample.valid.any()
    return result


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


# ---------------------------------------------------------------------- 1. PNG bytes


@settings(FAST, max_examples=scaled(120))
@given(data=byte_mutations(BASE_PNG), name=st.sampled_from(["000.png", "x.jpg", "y.bmp"]))
def test_mutated_png_bytes(scratch: Path, data: bytes, name: str) -> None:
    COUNTS["1 png bytes (truncated/flipped/overwritten)"] += 1
    path = scratch / "png-bytes" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    with time_limit(20), memory_cap():
        check_all_image_readers(path)


@settings(FAST, max_examples=scaled(100))
@given(data=png_semantic_mutations())
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # refused by our own size guard
def test_png_with_hostile_chunks_and_valid_crcs(scratch: Path, data: bytes) -> None:
    COUNTS["1 png chunks (hostile content, CRCs fixed)"] += 1
    path = scratch / "png-chunks" / "000.png"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    with time_limit(20), memory_cap():
        check_all_image_readers(path)


@settings(FAST, max_examples=scaled(40))
@given(data=byte_mutations(BASE_DEPTH_PNG))
def test_mutated_16bit_depth_png(scratch: Path, data: bytes) -> None:
    COUNTS["1 depth png bytes"] += 1
    path = scratch / "depth-bytes" / "000_depth.png"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    with time_limit(20), memory_cap():
        check_all_image_readers(path)


# ---------------------------------------------------------------------- 2. TIFF bytes and arrays


@settings(FAST, max_examples=scaled(120))
@given(data=byte_mutations(BASE_TIFF))
def test_mutated_xyz_tiff_bytes(scratch: Path, data: bytes) -> None:
    COUNTS["2 xyz tiff bytes (truncated/flipped/overwritten)"] += 1
    path = scratch / "tiff-bytes" / "000.tiff"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    with time_limit(20), memory_cap():
        check_geometry_result(path)


DTYPES = [np.float32, np.float64, np.float16, np.int16, np.uint16, np.uint8, np.int32, np.uint64, np.bool_,
          np.complex64]


@st.composite
def geometry_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    shape = draw(st.sampled_from([(h, w, 3), (h, w, 3), (h, w), (h, w, 1), (h, w, 2), (h, w, 4), (1, w), (h, 1)]))
    if dtype.kind == "f":
        elements = st.floats(width=min(64, dtype.itemsize * 8), allow_nan=True, allow_infinity=True)
    elif dtype.kind == "c":
        elements = st.complex_numbers(width=dtype.itemsize * 8, allow_nan=True, allow_infinity=True)
    else:
        elements = None
    arr = draw(hnp.arrays(dtype, shape, elements=elements))
    if dtype.kind == "f" and draw(st.booleans()):  # mostly plausible points with a few NaN/inf
        arr = np.full(shape, 0.5, dtype)
        flat = arr.reshape(-1)
        for at in draw(st.lists(st.integers(0, flat.size - 1), max_size=6)):
            flat[at] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))
    return arr


def expected_geometry(arr: np.ndarray) -> tuple[np.ndarray, str] | None:
    """What read_geometry_tiff must return for an array written to a TIFF, or None for a DataError."""
    if arr.dtype.kind not in "iuf":  # bool and complex are no coordinates
        return None
    if arr.ndim == 3 and arr.shape[2] not in (1, 3):
        return None
    kind = "xyz" if arr.ndim == 3 and arr.shape[2] == 3 else "depth"
    arr = arr if kind == "xyz" else arr.reshape(arr.shape[0], arr.shape[1])
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    out[~np.isfinite(out)] = 0.0
    if kind == "xyz":
        out[~np.isfinite(arr).all(axis=-1)] = 0.0
    return out, kind


@settings(FAST, max_examples=scaled(100))
@given(arr=geometry_arrays())
def test_geometry_tiff_of_any_dtype_shape_and_nan(scratch: Path, arr: np.ndarray) -> None:
    COUNTS["2 geometry tiff arrays (dtype/shape/NaN/inf)"] += 1
    path = scratch / "tiff-arrays" / "000.tiff"
    path.parent.mkdir(exist_ok=True)
    contig = arr.ndim == 3 and arr.shape[2] > 1
    try:
        path.write_bytes(tiff_bytes(arr, photometric="minisblack", planarconfig="contig" if contig else None))
    except ValueError:  # tifffile cannot write it: nothing to read
        assume(False)
    expected = expected_geometry(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float64 -> float32 overflow is expected here
        result = check_geometry_result(path)
        if expected is None:
            assert result is None, f"{arr.dtype} {arr.shape} was accepted"
            return
        assert result is not None, f"a valid {arr.dtype} {arr.shape} array was refused"
        np.testing.assert_array_equal(result[0], expected[0])
        assert result[1] == expected[1]
        record = SampleRecord(class_name="widget", split="train", label="good", geometry=path,
                              geometry_kind="xyz")
        sample, _ = attempt(load_sample, record, names=path.name)
        assert (sample is not None) == (expected[1] == "xyz" and bool(np.any(expected[0] != 0)))


# ---------------------------------------------------------------------- 3. huge declared dimensions


def png_header_only(width: int, height: int, depth: int, colour: int, interlace: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return png_build([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\0" * 64)), (b"IEND", b"")])


SIDE = st.one_of(st.integers(1, 2**31 - 1), st.sampled_from([1, 8192, 8193, 65535, 100_000, 2**31 - 1]))


@settings(FAST, max_examples=scaled(40))
@given(width=SIDE, height=SIDE,
       mode=st.sampled_from([(8, 2), (8, 0), (16, 0), (16, 2), (8, 6), (16, 6), (1, 0), (8, 3), (8, 4)]),
       interlace=st.sampled_from([0, 1]))
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_png_declaring_huge_dimensions(scratch: Path, width: int, height: int, mode: tuple[int, int],
                                       interlace: int) -> None:
    assume(width * height > MAX_PIXELS)
    COUNTS["3 huge png headers"] += 1
    path = scratch / "huge-png" / "000.png"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(png_header_only(width, height, *mode, interlace))
    readers: list[Callable[[], Any]] = [
        lambda: read_rgb(path), lambda: read_mask(path), lambda: read_depth_png(path, None),
        lambda: load_sample(SampleRecord(class_name="widget", split="train", label="good", rgb=path)),
    ]
    for read in readers:
        started = time.monotonic()
        with time_limit(20), memory_cap(), pytest.raises(DataError) as info:
            read()
        check_error(info.value, DataError, names=path.name)
        assert "pixels" in str(info.value), str(info.value)
        no_memory_error(info.value)
        assert time.monotonic() - started < 5.0


def tiff_header_only(width: int, height: int, spp: int, bits: int, fmt: int, planar: int,
                     tile: tuple[int, int] | None, depth: int) -> bytes:
    """A little-endian classic TIFF: one IFD declaring the image, 64 bytes of pixel data."""
    entries: list[tuple[int, int, int, int]] = [  # tag, type (3 SHORT, 4 LONG), count, value
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, bits), (259, 3, 1, 1),
        (262, 3, 1, 1 if spp < 3 else 2), (277, 3, 1, spp), (284, 3, 1, planar), (339, 3, 1, fmt),
    ]
    if depth > 1:
        entries.append((32997, 4, 1, depth))  # ImageDepth (SGI): volumetric data
    if tile is None:
        entries += [(273, 4, 1, 0), (278, 4, 1, height), (279, 4, 1, 64)]
    else:
        entries += [(322, 4, 1, tile[0]), (323, 4, 1, tile[1]), (324, 4, 1, 0), (325, 4, 1, 64)]
    entries.sort()
    pixels_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if tag in (273, 324):
            value = pixels_at
        packed = struct.pack("<H", value) + b"\0\0" if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + bytes(range(64))


@settings(FAST, max_examples=scaled(60))
@given(width=SIDE, height=SIDE,
       spp=st.sampled_from([1, 3, 3, 4, 255, 65535]) | st.integers(1, 65535),
       bits_fmt=st.sampled_from([(32, 3), (64, 3), (16, 1), (8, 1), (16, 2)]),
       planar=st.sampled_from([1, 2]),
       tile=st.none() | st.tuples(st.sampled_from([16, 256, 65536, 2**31]), st.sampled_from([16, 256, 65536, 2**31])),
       depth=st.sampled_from([1, 1, 1, 3, 1000, 2**20]))
def test_tiff_declaring_huge_dimensions(scratch: Path, width: int, height: int, spp: int,
                                        bits_fmt: tuple[int, int], planar: int, tile: tuple[int, int] | None,
                                        depth: int) -> None:
    legit_shape = depth == 1 and (spp == 1 or (spp == 3 and planar == 1))  # HxW depth or HxWx3 xyz
    refused = width * height > MAX_PIXELS or not legit_shape
    # a legit shape within the pixel limit may be read or refused (its pixels are not in the file), but
    # never by first allocating what the header declares
    COUNTS["3 huge tiff headers"] += 1
    path = scratch / "huge-tiff" / "000.tiff"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(tiff_header_only(width, height, spp, *bits_fmt, planar, tile, depth))
    for read in (lambda: read_geometry_tiff(path),
                 lambda: load_sample(SampleRecord(class_name="widget", split="train", label="good",
                                                  geometry=path, geometry_kind="xyz"))):
        started = time.monotonic()
        with time_limit(20), memory_cap():
            try:
                read()
            except DataError as exc:
                check_error(exc, DataError, names=path.name)
                no_memory_error(exc)
            else:
                assert not refused, f"{width}x{height}x{spp} (depth {depth}, planar {planar}) was read"
        assert time.monotonic() - started < 5.0
    attempt(image_size, path, names=path.name)  # header only: a size or a DataError


# ---------------------------------------------------------------------- 4. malformed YAML


def _sections() -> dict[str, list[str]]:
    out = {}
    for f in dataclasses.fields(Config):
        out[f.name] = [g.name for g in dataclasses.fields(f.default_factory())]  # type: ignore[misc]
    return out


SECTIONS = _sections()
KNOWN_KEYS = sorted(set(SECTIONS) | {k for keys in SECTIONS.values() for k in keys})
YAML_KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8), st.integers(-5, 5), st.none(),
                      st.booleans(), st.floats(allow_nan=False), st.dates())
YAML_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(10**300, 10**400), st.integers(-(10**400), -(10**300)),
    st.floats(), st.text(max_size=12), st.sampled_from(["strided", "cross", "max", "topk", "herding", "random",
                                                        "per_class", "total"]),
    st.binary(max_size=8), st.dates(),
)
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(YAML_KEYS, inner, max_size=4), max_leaves=12)


@st.composite
def config_like(draw: st.DrawFn) -> dict:
    """Mostly the right sections and keys, with values of any type (or unknown keys)."""
    doc: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(list(SECTIONS)) | YAML_KEYS)
        if section in SECTIONS and draw(st.booleans()):
            body = {draw(st.sampled_from(SECTIONS[section]) | YAML_KEYS): draw(YAML_VALUES)
                    for _ in range(draw(st.integers(0, 3)))}
        else:
            body = draw(YAML_VALUES)
        doc[section] = body
    return doc


def nested(depth: int, style: str) -> str:
    if style == "flow-list":
        return "[" * depth + "]" * depth
    if style == "flow-map":
        return "{a: " * depth + "1" + "}" * depth
    if style == "block-map":
        return "".join("  " * i + "model:\n" for i in range(depth)) + "  " * depth + "dim: 1\n"
    return "".join("  " * i + "-\n" for i in range(depth)) + "  " * depth + "1\n"


YAML_TEMPLATES = [
    "model: &m {dim: 1}\nloss: *m\n", "a: &a [1, 2]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n",
    "model: !!python/object/apply:os.system ['true']\n", "train: {lr: !!binary aGVsbG8=}\n",
    "score: !!set {max, topk}\n", "train: !!omap [{lr: 1.0}]\n", "? [1, 2]\n: 3\n", "model: {dim: 1, dim: 2}\n",
    "%YAML 1.1\n---\nmodel: {}\n--- \nloss: {}\n", "train: {epochs: 1e3}\n", "train: {epochs: 0x10}\n",
    "model: {routes: [strided]}\n", "backbone: {levels: [1, [2]]}\n", "backbone: {weights: ~}\n",
    "\ufeffmodel: {dim: 3}\n", "model:\n\tdim: 1\n", "'unterminated: 1\n", "model: {dim: 1\n", "*undefined\n",
    "- a\n- b\n", "42\n", "\"text\"\n", "", "---\n...\n", "model: {dim: 1}\nmodel: {dim: 2}\n",
    "train: {seed: .nan, lr: .inf}\n", "train: {lr: 1" + "0" * 400 + "}\n", "train: {lr: 1" + "0" * 5000 + "}\n",
    "train: {epochs: 0x" + "f" * 5000 + "}\n", "train: {seed: 0x" + "f" * 20 + "}\n", "? 0x" + "f" * 5000 + "\n: 1\n",
    '"a\\nb": 1\n', "model: {? [a]: 1}\n", "model: {routes: " + "x" * 10_000 + "}\n", "x" * 10_000 + ": 1\n",
]


@st.composite
def yaml_files(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["text", "binary", "config", "template", "nested", "flipped"]))
    if kind == "text":
        return kind, draw(st.text()).encode("utf-8", "surrogatepass")
    if kind == "binary":
        return kind, draw(st.binary())
    if kind == "config":
        return kind, yaml.safe_dump(draw(config_like()), sort_keys=False, allow_unicode=True).encode("utf-8")
    if kind == "template":
        return kind, draw(st.sampled_from(YAML_TEMPLATES)).encode("utf-8")
    if kind == "nested":
        style = draw(st.sampled_from(["flow-list", "flow-map", "block-map", "block-list"]))
        # past Python's recursion limit either way; block styles grow quadratically with depth
        depth = draw(st.integers(50, 3000 if style.startswith("flow") else 800))
        return kind, nested(depth, style).encode()
    base = bytearray(yaml.safe_dump({"model": {"dim": 64, "routes": "cross"}, "train": {"lr": 0.01}}).encode())
    for at, bit in draw(st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 7)), min_size=1,
                                 max_size=4)):
        base[at] ^= 1 << bit
    return kind, bytes(base)


@settings(FAST, max_examples=scaled(150))
@given(file=yaml_files())
def test_malformed_yaml_config(scratch: Path, file: tuple[str, bytes]) -> None:
    kind, data = file
    COUNTS[f"4 yaml config ({kind})"] += 1
    path = scratch / "config.yaml"
    path.write_bytes(data)
    with time_limit(20):
        cfg, error = attempt(load_config, path, kind=UsageError, names=path.name)
    if error is not None:
        assert len(str(error)) < len(str(path)) + 400, f"{len(str(error))} chars: {str(error)[:200]!r}"
    if cfg is not None:
        assert isinstance(cfg, Config)
        cfg.hash()  # a returned config is usable


@settings(FAST, max_examples=scaled(6))
@given(target=st.sampled_from(["directory", "self-loop", "dangling", "mutual-loop", "missing"]))
def test_config_path_that_is_no_file(scratch: Path, target: str) -> None:
    COUNTS["4 yaml config path (dir/loop/dangling)"] += 1
    where = Path(tempfile.mkdtemp(dir=scratch))
    path = where / "config.yaml"
    if target == "directory":
        path.mkdir()
    elif target == "self-loop":
        path.symlink_to("config.yaml")
    elif target == "dangling":
        path.symlink_to("nowhere.yaml")
    elif target == "mutual-loop":
        path.symlink_to("other.yaml")
        (where / "other.yaml").symlink_to("config.yaml")
    with time_limit(20):
        _, error = attempt(load_config, path, kind=UsageError, names=path.name)
    assert error is not None


# ---------------------------------------------------------------------- 5. hostile data folders


def _eyecandies_sample(data: Path, sid: str, size: int = 8) -> None:
    rng = np.random.default_rng(int(sid))
    for light in range(6):
        write_png(data / f"{sid}_image_{light}.png", rng.integers(0, 255, (size, size, 3), np.uint8))
    write_png(data / f"{sid}_depth.png", rng.integers(1, 65535, (size, size)).astype(np.uint16))
    write_png(data / f"{sid}_mask.png", np.zeros((size, size), np.uint8))
    (data / f"{sid}_info_depth.yaml").write_text("normalization: {min: 0.4, max: 0.9}\n")
    (data / f"{sid}_metadata.yaml").write_text("anomalous: 0\nbumps: 0\ncolors: 0\ndents: 0\nnormals: 0\n")


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny valid class per layout: template/<layout>/<class>."""
    root = tmp_path_factory.mktemp("templates")
    rgb, xyz = scene(8)
    mv = root / "mvtec3d" / "widget"
    for split, label in (("train", "good"), ("validation", "good"), ("test", "good"), ("test", "crack")):
        for i in range(2):
            write_png(mv / split / label / "rgb" / f"{i:03d}.png", rgb)
            write_tiff(mv / split / label / "xyz" / f"{i:03d}.tiff", xyz)
            if split == "test":
                write_png(mv / split / label / "gt" / f"{i:03d}.png", np.zeros((8, 8), np.uint8))
    fo = root / "folder" / "bracket"
    for i in range(2):
        write_png(fo / "good" / f"{i:03d}.png", rgb)
        write_tiff(fo / "good" / f"{i:03d}.tiff", xyz)
        write_png(fo / "defect_x" / "rgb" / f"{i:03d}.png", rgb)
        write_png(fo / "defect_x" / "depth" / f"{i:03d}.png", np.full((8, 8), 600, np.uint16))
        write_png(fo / "masks" / "defect_x" / f"{i:03d}.png", np.zeros((8, 8), np.uint8))
    ey = root / "eyecandies" / "CandyCane"
    for split_dir in ("train", "val", "test_public"):
        for sid in ("000", "001"):
            _eyecandies_sample(ey / split_dir / "data", sid)
    layouts.mvtec_ad_class(root / "mvtec_ad", "bottle", n_train=2, n_good=1, defects=("crack",), size=8)
    layouts.mvtec_ad2_class(root / "mvtec_ad2", "vial", n_train=2, n_val=1, n_good=1, n_bad=2, size=8)
    layouts.loco_class(root / "mvtec_loco", "pushpins", n_train=2, n_val=1, n_good=1, size=8)
    layouts.visa_dataset(root / "visa", ("candle",), n_train=2, n_good=1, n_anomaly=2, size=8)
    desc = root / "described" / "hinge"
    folders = layouts.described_folders(desc, n_train=2, n_good=1, n_abnormal=2, size=8)
    (desc / DESCRIPTION_FILE).write_text(yaml.safe_dump({k: v.name for k, v in folders.items()}))
    return root


LOCATIONS = {
    "mvtec3d": ["", "train", "train/good", "train/good/rgb", "train/good/xyz", "validation/good/rgb", "test",
                "test/crack", "test/crack/gt", "test/good/xyz"],
    "folder": ["", "good", "defect_x", "defect_x/rgb", "defect_x/depth", "masks", "masks/defect_x"],
    "eyecandies": ["", "train", "train/data", "val/data", "test_public", "test_public/data"],
    "mvtec_ad": ["", "train", "train/good", "test", "test/good", "test/crack", "ground_truth", "ground_truth/crack"],
    "mvtec_ad2": ["", "train/good", "validation/good", "test_public", "test_public/bad", "test_public/ground_truth",
                  "test_public/ground_truth/bad"],
    "mvtec_loco": ["", "train/good", "test", "test/logical_anomalies", "ground_truth/logical_anomalies",
                   "ground_truth/logical_anomalies/000"],
    "visa": ["", "Data", "Data/Images", "Data/Images/Normal", "Data/Images/Anomaly", "Data/Masks/Anomaly"],
    "described": ["", "normal", "normal_test", "abnormal", "masks"],
}
ENTRY_NAMES = {
    "mvtec3d": ["loop", "000.png", "001.png", "002.png", "000.tiff", "002.tiff", "rgb", "xyz", "gt", "good", "train",
                "test", "crack", ".hidden"],
    "folder": ["loop", "000.png", "002.png", "000.tiff", "002_depth.png", "000_mask.png", "rgb", "depth", "xyz",
               "good", "masks", "defect_y", "defect_x"],
    "eyecandies": ["loop", "data", "train", "test_public", "001_image_4.png", "002_image_4.png", "000_depth.png",
                   "001_info_depth.yaml", "000_metadata.yaml", "001_metadata.yaml", "000_mask.png"],
    "mvtec_ad": ["loop", "000.png", "001.png", "000_mask.png", "005_mask.png", "000", "good", "ok", "train", "test",
                 "ground_truth", "crack", "dent", "test_public", ".hidden"],
    "mvtec_ad2": ["loop", "000_regular.png", "001_regular_mask.png", "005_regular.png", "good", "bad", "train",
                  "ground_truth", "test", "test_public"],
    "mvtec_loco": ["loop", "000.png", "001.png", "003.png", "000", "001", "good", "logical_anomalies",
                   "structural_anomalies", "ground_truth"],
    "visa": ["loop", "0000.JPG", "0001.JPG", "000.JPG", "000.png", "Images", "Masks", "Normal", "Anomaly",
             "split_csv"],
    "described": ["loop", "n000.png", "t000.png", "a000.png", "a001_mask.png", "a009.png", DESCRIPTION_FILE,
                  "normal", "masks", "good"],
}
ENTRY_KINDS = ["parent-loop", "self-loop", "dangling", "mutual-loop", "class-root", "dataset-root", "directory",
               "devzero", "devnull", "fifo", "empty-file"]


def plant(where: Path, name: str, kind: str, dataset: Path, cls: Path) -> None:
    """Replace (or add) `where/name` with a hostile entry."""
    entry = where / name
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    elif os.path.lexists(entry):  # a file, a symlink (even dangling or looping), a FIFO
        entry.unlink()
    if kind == "parent-loop":
        entry.symlink_to("..", target_is_directory=True)
    elif kind == "self-loop":
        entry.symlink_to(name)
    elif kind == "dangling":
        entry.symlink_to("does-not-exist")
    elif kind == "mutual-loop":
        entry.symlink_to(name + ".twin")
        twin = where / (name + ".twin")
        if not twin.is_symlink() and not twin.exists():
            twin.symlink_to(name)
    elif kind == "class-root":
        entry.symlink_to(cls, target_is_directory=True)
    elif kind == "dataset-root":
        entry.symlink_to(dataset, target_is_directory=True)
    elif kind == "directory":
        entry.mkdir()
    elif kind == "devzero":
        entry.symlink_to("/dev/zero")
    elif kind == "devnull":
        entry.symlink_to("/dev/null")
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        entry.write_bytes(b"")


def walk_everything(root: Path) -> int:
    """find_classes, every split's records, every sample: results or DataError; returns samples loaded."""
    sources, _ = attempt(find_classes, root)
    loaded = 0
    for source in sources or []:
        for split in SPLITS:
            records, _ = attempt(source.records, split)
            for record in records or []:
                sample, _ = attempt(load_sample, record)
                if sample is not None:
                    loaded += 1
                    if sample.geometry is not None:
                        assert np.isfinite(sample.geometry).all()
    return loaded


@settings(FAST, max_examples=scaled(80))
@given(layout=st.sampled_from(list(LOCATIONS)), data=st.data(), point_at=st.sampled_from(["dataset", "class"]))
def test_data_folders_with_symlink_loops_and_odd_entries(templates: Path, scratch: Path, layout: str,
                                                         data: st.DataObject, point_at: str) -> None:
    COUNTS["5 hostile data folders (symlink loops, dangling, fifo, ...)"] += 1
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        dataset = work / "dataset"
        shutil.copytree(templates / layout, dataset, symlinks=True)
        cls = next(p for p in sorted(dataset.iterdir()) if p.name != "split_csv")  # VisA's split file is no class
        plants = data.draw(st.lists(st.tuples(st.sampled_from(LOCATIONS[layout]), st.sampled_from(ENTRY_NAMES[layout]),
                                              st.sampled_from(ENTRY_KINDS)), min_size=1, max_size=4))
        for location, name, kind in plants:
            where = cls / location
            if where.is_dir() and not where.is_symlink():
                plant(where, name, kind, dataset, cls)
        with time_limit(30), memory_cap():
            walk_everything(dataset if point_at == "dataset" else cls)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@settings(FAST, max_examples=scaled(6))
@given(kind=st.sampled_from(["self-loop", "mutual-loop", "dangling", "devnull"]))
def test_dataset_path_itself_is_a_loop(scratch: Path, kind: str) -> None:
    COUNTS["5 dataset path itself hostile"] += 1
    work = Path(tempfile.mkdtemp(dir=scratch))
    plant(work, "dataset", kind, work, work)
    with time_limit(20):
        _, error = attempt(find_classes, work / "dataset", names="dataset")
    assert error is not None


@st.composite
def eyecandies_yaml(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["normalization", "metadata", "any"]))
    if kind == "normalization":
        value = st.one_of(YAML_SCALARS, st.sampled_from([float("inf"), float("-inf"), float("nan"), 10**400,
                                                         "0.5", 0, -1.0, 1e308]))
        doc: Any = {"normalization": {"min": draw(value), "max": draw(value)}}
        if draw(st.booleans()):
            doc = {"normalization": draw(YAML_VALUES)}
        return kind, yaml.safe_dump(doc, sort_keys=False).encode()
    if kind == "metadata":
        doc = {k: draw(YAML_VALUES) for k in draw(st.lists(st.sampled_from(
            ["anomalous", "bumps", "colors", "dents", "normals", "other"]), max_size=5))}
        return kind, yaml.safe_dump(doc, sort_keys=False).encode()
    return kind, draw(yaml_files())[1]


@settings(FAST, max_examples=scaled(30))
@given(split_dir=st.sampled_from(["train", "test_public"]), which=st.sampled_from(["info_depth", "metadata"]),
       file=eyecandies_yaml())
def test_eyecandies_hostile_yaml(templates: Path, scratch: Path, split_dir: str, which: str,
                                 file: tuple[str, bytes]) -> None:
    COUNTS["5 eyecandies yaml (normalization/metadata)"] += 1
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        shutil.copytree(templates / "eyecandies", work / "dataset", symlinks=True)
        (work / "dataset" / "CandyCane" / split_dir / "data" / f"001_{which}.yaml").write_bytes(file[1])
        with time_limit(30):
            walk_everything(work / "dataset")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@st.composite
def described_yaml(draw: st.DrawFn) -> bytes:
    """Mostly the right keys, with values of any type, folders that may not exist, or any YAML at all."""
    if draw(st.booleans()):
        return draw(yaml_files())[1]
    keys = draw(st.lists(st.sampled_from(["normal", "abnormal", "masks", "normal_test", "other"]), max_size=5))
    folder = st.sampled_from(["normal", "abnormal", "masks", "normal_test", "nowhere", "../..", "", ".",
                              "normal/../abnormal", "/dev/null", "x" * 5000])
    doc = {k: draw(st.one_of(folder, YAML_VALUES)) for k in keys}
    return yaml.safe_dump(doc, sort_keys=False).encode()


@settings(FAST, max_examples=scaled(30))
@given(file=described_yaml())
def test_described_folders_hostile_yaml(templates: Path, scratch: Path, file: bytes) -> None:
    COUNTS["5 described folders yaml (iumad-data.yaml)"] += 1
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        shutil.copytree(templates / "described", work / "dataset", symlinks=True)
        (work / "dataset" / "hinge" / DESCRIPTION_FILE).write_bytes(file)
        with time_limit(30):
            walk_everything(work / "dataset")
    finally:
        shutil.rmtree(work, ignore_errors=True)


VISA_FIELDS = st.one_of(
    st.sampled_from(["candle", "pcb1", "train", "test", "val", "normal", "anomaly", "", "candle/Data/Images/Normal/0000.JPG",
                     "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png", "candle/Data",
                     "../../etc/passwd", "/dev/zero", "candle/Data/Masks/Anomaly/999.png", '"', "a,b"]),
    st.text(max_size=12),
)


@settings(FAST, max_examples=scaled(40))
@given(header=st.sampled_from(["object,split,label,image,mask", "object,split,label,image", "mask,image,label,split,object",
                               "", "\ufeffobject,split,label,image,mask"]),
       rows=st.lists(st.lists(VISA_FIELDS, min_size=0, max_size=6), max_size=6), tail=st.binary(max_size=16))
def test_visa_hostile_split_csv(templates: Path, scratch: Path, header: str, rows: list[list[str]],
                                tail: bytes) -> None:
    COUNTS["5 visa split csv (1cls.csv)"] += 1
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        shutil.copytree(templates / "visa", work / "dataset", symlinks=True)
        buf = io.StringIO()
        csv.writer(buf).writerows([header.split(",")] + rows if header else rows)
        (work / "dataset" / "split_csv" / "1cls.csv").write_bytes(buf.getvalue().encode("utf-8", "surrogatepass") + tail)
        with time_limit(30):
            walk_everything(work / "dataset")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------- 6. class names


HOSTILE_NAMES = [
    "", ".", "..", "../x", "../../etc/passwd", "a/b", "a\\b", "/abs", "a/../b", "'; DROP TABLE classes; --",
    "x' OR '1'='1", 'a"b', "a;b", "a%", "a_%", "a\x00b", "\x00", "A", "Cable", "ümlaut", "日本", "a\n", "\na",
    "a b", "a\u2028b", "-a", "_a", "-", "--help", "a" * 65, "a" * 10_000, "\U000e0001" * 50, "\x85" * 40,
    "é" * 10_000, "a\t", "a\r", "CON", "nul", "a.b", "a:b", "a*", "~a", "$HOME", "`id`", "${x}", "a\ud800",
]


def _long(parts: tuple[str, int]) -> str:
    return (parts[0] * parts[1])[:10_000]


NAMES = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(list("abz09_-./\\'\";%\x00 AZ\n\té日\u2028\U000e0001")), max_size=70),
    st.from_regex(r"[a-z0-9][a-z0-9_-]{0,63}", fullmatch=True),
    st.from_regex(r"[a-z0-9][a-z0-9_-]{60,70}\n?", fullmatch=True),
    st.sampled_from(HOSTILE_NAMES),
    st.tuples(st.text(min_size=1, max_size=3), st.integers(1, 10_000)).map(_long),
)


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and VALID_NAME.fullmatch(name) is not None


def check_name_error(exc: BaseException) -> None:
    check_error(exc, UsageError)
    text = str(exc)
    assert len(text) < 300, f"{len(text)} chars: {text[:120]!r}..."
    assert "\x00" not in text


@settings(FAST, max_examples=scaled(300))
@given(name=NAMES | st.one_of(st.none(), st.integers(), st.binary(max_size=8), st.lists(st.text(max_size=3))))
def test_validate_class_name(name: Any) -> None:
    COUNTS["6 class names validated"] += 1
    result, error = attempt(repo.validate_class_name, name, kind=UsageError)
    if is_valid_name(name):
        assert error is None and result == name
    else:
        assert result is None and error is not None
        check_name_error(error)


def dump_store(store: Store) -> dict[str, list[tuple]]:
    """Every row of every table, read through a separate connection (what is committed)."""
    con = sqlite3.connect(str(store.sqlite_path))
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: con.execute(f'SELECT * FROM "{t}" ORDER BY rowid').fetchall() for t in tables}
    finally:
        con.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """A real store holding one class (so that 'unchanged' has rows to compare)."""
    opened = Store.open(tmp_path_factory.mktemp("store"))
    with opened.session() as s:
        repo.register_class(s, "seed-class", modalities=["rgb", "geometry"], data_root="/data/seed")
    yield opened
    opened.close()


@settings(FAST, max_examples=scaled(100))
@given(name=NAMES.filter(lambda n: not is_valid_name(n)) | st.just("seed-class"))
def test_register_class_refuses_bad_names_and_leaves_the_store_unchanged(store: Store, name: str) -> None:
    COUNTS["6 class names registered in a store"] += 1
    before = dump_store(store)
    with pytest.raises(UsageError) as info:
        with store.session() as s:
            repo.register_class(s, name, modalities=["rgb"], data_root="/data/x")
    check_name_error(info.value)
    assert dump_store(store) == before


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("cli-store")
    with Store.open(root) as opened, opened.session() as s:
        repo.register_class(s, "seed-class", modalities=["rgb"], data_root="/data/seed")
    yield root


@settings(FAST, max_examples=scaled(20))
@given(name=st.sampled_from(HOSTILE_NAMES) | NAMES.filter(lambda n: not is_valid_name(n)))
def test_cli_add_class_with_bad_name_exits_2(cli_store: Path, templates: Path, name: str) -> None:
    from typer.testing import CliRunner

    from iumad.cli import app

    assume(not is_valid_name(name))
    COUNTS["6 class names through the CLI"] += 1
    with Store.open(cli_store) as opened:
        before = dump_store(opened)
    # options first and "--" before the name: a name such as "--help" must stay a name
    result = CliRunner().invoke(app, ["add-class", "--data", str(templates / "mvtec3d"), "--store",
                                      str(cli_store), "--", name])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    with Store.open(cli_store) as opened:
        assert dump_store(opened) == before
