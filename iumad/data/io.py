"""Guarded file readers: every failure becomes a one-line DataError naming the file and the fix.

Headers are checked before pixels are decoded, so a file that declares absurd dimensions cannot exhaust
memory.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from iumad.errors import DataError

MAX_PIXELS = 8192 * 8192
"""Largest image (H*W) any reader decodes; bigger headers are refused before decoding."""

RGB_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tiff", ".tif")


def _check_pixels(path: Path, width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
        raise DataError(
            f"{path}: declares {width}x{height} pixels (limit {MAX_PIXELS}); "
            "resize the image or check that the file is not corrupt",
            file=path, fix="resize the image or check that the file is not corrupt",
        )


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode a PIL image, turning every failure into DataError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            _check_pixels(path, *img.size)
            img.load()
        return img
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the data path", file=path,
                        fix="check the data path") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: declares too many pixels ({_short(exc)}); resize the image or check that "
                        "the file is not corrupt", file=path,
                        fix="resize the image or check that the file is not corrupt") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({_short(exc)}); replace or remove the file", file=path,
                        fix="replace or remove the file") from None
    except MemoryError:  # a corrupt chunk length makes PIL read (allocate) up to 4 GiB at once
        raise DataError(f"{path}: unreadable image (a corrupt header asks for more memory than available); "
                        "replace or remove the file", file=path, fix="replace or remove the file") from None


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def read_rgb(path: Path, size: int | None = None) -> np.ndarray:
    """Read an 8-bit colour image as HxWx3 uint8 (grey is expanded, alpha dropped); with `size`, as
    size x size, resized (PIL bilinear, antialiased: the backbone's own resize) before any copy."""
    img = _open_image(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise DataError(f"{path}: is a {img.mode} image, not 8-bit colour; pass it as depth, not rgb",
                        file=path, fix="pass it as depth, not rgb")
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def resample_nearest(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, ...) -> (size, size, ...): pixel ``i`` takes source pixel ``i * H // size`` (as the
    shared 224 px MVTec 3D-AD copies were made), so every value is one the sensor measured; no point is
    interpolated between two surfaces."""
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    rows = np.arange(size) * h // size
    cols = np.arange(size) * w // size
    return arr[rows[:, None], cols[None, :]]


def read_mask(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as HxW bool (any non-zero pixel is a defect, as MVTec ids 252..255)."""
    img = _open_image(path)
    arr = np.asarray(img.convert("L") if img.mode not in ("L", "1", "I;16", "I") else img)
    mask = arr > 0
    if shape is not None and mask.shape != tuple(shape):
        raise DataError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}; "
            "masks must match their image size",
            file=path, fix="masks must match their image size",
        )
    return mask


def read_depth_png(path: Path, depth_range: tuple[float, float] | None, unit_m: float = 0.001,
                   size: int | None = None) -> np.ndarray:
    """Read a 16-bit depth PNG as HxW float32 metres, 0 where missing; with `size`, resampled to
    size x size (`resample_nearest`) before it is converted.

    With `depth_range` (Eyecandies' info_depth.yaml) depth = v/65535*(max-min)+min; otherwise v*unit_m.
    """
    img = _open_image(path)
    arr = np.asarray(img)
    if arr.ndim != 2 or arr.dtype not in (np.uint16, np.int32, np.uint8):
        raise DataError(f"{path}: depth PNG must be single-channel 16-bit, got {img.mode}; "
                        "save depth as a 16-bit grey PNG", file=path, fix="save depth as a 16-bit grey PNG")
    if size is not None:
        arr = resample_nearest(arr, size)
    raw = arr.astype(np.float64)
    if depth_range is not None:
        lo, hi = depth_range
        depth = raw / 65535.0 * (hi - lo) + lo
        depth[arr == 0] = 0.0
    else:
        depth = raw * unit_m
    with np.errstate(over="ignore", invalid="ignore"):
        depth = depth.astype(np.float32)
    depth[~np.isfinite(depth)] = 0.0  # an absurd range overflows float32: missing, as in geometry TIFFs
    return depth


def read_geometry_tiff(path: Path, size: int | None = None) -> tuple[np.ndarray, str]:
    """Read an xyz (HxWx3) or depth (HxW) TIFF as float32; NaN/inf become missing (0). With `size`,
    resampled to size x size (`resample_nearest`) right after decoding, before any full-size copy.

    HALCON-written MVTec 3D-AD files carry a validity mask in a SubIFD; the first page holds the points and
    missing points are exactly (0, 0, 0), so the mask is implied and not read.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages:
                raise DataError(f"{path}: TIFF holds no image; replace the file", file=path, fix="replace the file")
            page = tif.pages[0]
            shape = tuple(int(s) for s in page.shape)
            if len(shape) < 2:
                raise DataError(f"{path}: TIFF page has shape {shape}; expected HxWx3 xyz or HxW depth", file=path)
            _check_tiff_page(path, page, tif.filehandle.size)
            arr = page.asarray()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the data path", file=path,
                        fix="check the data path") from None
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DataError(f"{path}: unreadable TIFF ({_short(exc)}); replace or remove the file", file=path,
                        fix="replace or remove the file") from None
    if arr.ndim == 3 and arr.shape[2] == 3:
        kind = "xyz"
    elif arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        arr = arr.reshape(arr.shape[0], arr.shape[1])
        kind = "depth"
    else:
        raise DataError(
            f"{path}: TIFF has shape {arr.shape}; expected HxWx3 xyz points or HxW depth", file=path
        )
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(f"{path}: TIFF dtype {arr.dtype} is not a real number type", file=path)
    if size is not None:
        arr = resample_nearest(arr, size)
    out = arr.astype(np.float32, copy=True)
    out[~np.isfinite(out)] = 0.0  # also a coordinate that overflows float32
    if kind == "xyz":  # a point with any non-finite coordinate is missing as a whole
        out[_any_coordinate(~np.isfinite(arr))] = 0.0
    return out, kind


def _check_tiff_page(path: Path, page: tifffile.TiffPage, file_size: int) -> None:
    """Refuse from the header alone what is no HxW / HxWx3 image or would make the decoder allocate or
    loop far beyond what the file holds: volumes, odd sample counts, missing strips or tiles, truncation."""
    width, height = int(page.imagewidth), int(page.imagelength)
    _check_pixels(path, width, height)
    depth, samples = int(page.imagedepth), int(page.samplesperpixel)
    if depth != 1 or samples not in (1, 3) or (samples == 3 and int(page.planarconfig) != 1):
        slices = f" in {depth} slices" if depth != 1 else ""
        raise DataError(f"{path}: TIFF declares {width}x{height} pixels with {samples} samples per pixel{slices}"
                        f" (planar config {int(page.planarconfig)}); expected HxWx3 xyz points or HxW depth",
                        file=path)
    segments = math.prod(int(n) for n in page.chunked)
    if segments > len(page.dataoffsets):
        raise DataError(f"{path}: TIFF declares {segments} strips or tiles but stores {len(page.dataoffsets)}; "
                        "the file is corrupt, replace it", file=path, fix="replace the file")
    if int(page.compression) == 1:
        need = math.prod(int(n) for n in page.shape) * int(page.bitspersample) // 8
        if need > file_size:
            raise DataError(f"{path}: TIFF declares {need} bytes of uncompressed pixels but the file holds "
                            f"{file_size}; the file is truncated, replace it", file=path,
                            fix="replace the file")


def validity(geometry: np.ndarray) -> np.ndarray:
    """HxW bool: True where a point was measured (xyz not all zero, depth > 0)."""
    if geometry.ndim == 3:
        return _any_coordinate(geometry != 0)
    return geometry > 0


def _any_coordinate(mask: np.ndarray) -> np.ndarray:
    """(H, W, C) bool -> (H, W): True where any coordinate is; one pass per coordinate, since np.any over
    a length-3 last axis is several times slower."""
    out = mask[..., 0].copy()
    for c in range(1, mask.shape[-1]):
        out |= mask[..., c]
    return out


def is_stray(path: Path) -> bool:
    """Files readers skip: hidden files (.DS_Store), notes, anything that is not image data."""
    return path.name.startswith(".") or path.suffix.lower() not in RGB_SUFFIXES + TIFF_SUFFIXES


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header alone, without decoding pixels."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        with Image.open(path) as img:
            w, h = img.size
        return h, w
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the data path", file=path,
                        fix="check the data path") from None
    except Exception as exc:
        raise DataError(f"{path}: unreadable header ({_short(exc)}); replace or remove the file", file=path,
                        fix="replace or remove the file") from None
