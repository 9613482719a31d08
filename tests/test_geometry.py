"""Geometry preprocessing: synthetic scenes with known truth, error handling, and one real sample."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from iumad.data.geometry import (
    PREPROCESSING_VERSION,
    GeometryImage,
    depth_to_xyz,
    fill_missing,
    fit_background_plane,
    geometry_image,
    height_above_plane,
    preprocessing_key,
    sample_geometry_image,
    surface_normals,
)
from iumad.data.sample import Sample
from iumad.errors import DataError

H = W = 96
PITCH = 0.6e-3  # metres between grid points, like MVTec 3D-AD at 224 px


def _frame(tilt_deg: tuple[float, float] = (12.0, -20.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal plane frame (e1, e2, n) with n the table normal toward the camera, and an origin."""
    ax, ay = np.deg2rad(tilt_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    r = ry @ rx
    e1, e2, n = r[:, 0], r[:, 1], -r[:, 2]  # n = -(r @ z): toward the camera (n_z < 0)
    origin = np.array([0.01, -0.005, 0.65])
    return e1, e2, n, origin


def _scene(
    heights: np.ndarray, noise: float = 0.0, seed: int = 0, tilt_deg: tuple[float, float] = (12.0, -20.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Organized cloud of a tilted table plus objects whose height above it is `heights` (HxW metres).

    Returns (xyz float32 HxWx3, true plane (a, b, c, d) with unit normal toward the camera).
    """
    e1, e2, n, origin = _frame(tilt_deg)
    h, w = heights.shape
    s = (np.arange(w) - (w - 1) / 2) * PITCH
    t = (np.arange(h) - (h - 1) / 2) * PITCH
    hh = heights
    if noise:
        hh = hh + np.random.default_rng(seed).normal(0, noise, heights.shape)
    xyz = origin + s[None, :, None] * e1 + t[:, None, None] * e2 + hh[:, :, None] * n
    plane = np.array([*n, -float(n @ origin)])
    return xyz.astype(np.float32), plane


def _box_heights(box_h: float = 0.02) -> np.ndarray:
    heights = np.zeros((H, W))
    heights[30:66, 28:70] = box_h
    return heights


def _hemisphere_heights(radius_px: int = 25) -> np.ndarray:
    v, u = np.mgrid[0:H, 0:W]
    rho2 = ((u - W / 2) ** 2 + (v - H / 2) ** 2) * PITCH**2
    r = radius_px * PITCH
    return np.sqrt(np.clip(r * r - rho2, 0, None))


def _holes(xyz: np.ndarray, frac: float = 0.2, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    valid = rng.random(xyz.shape[:2]) >= frac
    out = xyz.copy()
    out[~valid] = 0.0
    return out, valid


def _border(shape: tuple[int, int], width: int) -> np.ndarray:
    m = np.ones(shape, dtype=bool)
    m[width:-width, width:-width] = False
    return m


def _same_plane(got, truth) -> tuple[float, float]:
    """(angle between normals in degrees, |d difference| in metres) for unit-normal planes."""
    g, t = np.asarray(got, dtype=float), np.asarray(truth, dtype=float)
    cos = float(np.clip(g[:3] @ t[:3], -1, 1))
    return float(np.degrees(np.arccos(cos))), abs(g[3] - t[3])


# ---------------------------------------------------------------------------------------------- plane


def test_plane_recovered_with_30_percent_border_outliers():
    xyz, truth = _scene(_box_heights(), noise=0.2e-3)
    xyz, valid = _holes(xyz)
    band = _border((H, W), 10) & valid
    rng = np.random.default_rng(7)
    idx = np.flatnonzero(band.ravel())
    bad = rng.choice(idx, size=int(0.3 * idx.size), replace=False)
    n = truth[:3]
    flat = xyz.reshape(-1, 3)
    flat[bad] += (rng.uniform(0.003, 0.03, bad.size)[:, None] * rng.choice([-1, 1], bad.size)[:, None]) * n
    plane = fit_background_plane(xyz, valid)
    ang, dd = _same_plane(plane, truth)
    assert ang < 0.2
    assert dd < 0.3e-3
    assert plane[2] < 0  # oriented toward the camera
    assert np.isclose(np.linalg.norm(plane[:3]), 1.0)


def test_plane_fit_is_deterministic():
    xyz, _ = _scene(_box_heights(), noise=0.3e-3)
    assert fit_background_plane(xyz, rng_seed=3) == fit_background_plane(xyz, rng_seed=3)


def test_plane_falls_back_to_all_points_when_border_is_empty():
    xyz, truth = _scene(np.zeros((H, W)), noise=0.1e-3)
    valid = ~_border((H, W), 20)
    xyz[~valid] = 0.0
    ang, dd = _same_plane(fit_background_plane(xyz, valid), truth)
    assert ang < 0.2 and dd < 0.2e-3


def test_height_of_box_and_hemisphere_recovered():
    for heights in (_box_heights(0.02), _hemisphere_heights()):
        xyz, truth = _scene(heights, noise=0.1e-3)
        xyz, valid = _holes(xyz, 0.1)
        got = height_above_plane(xyz, valid, fit_background_plane(xyz, valid))
        err = np.abs(got - heights)[valid]
        assert np.median(err) < 0.2e-3
        assert np.percentile(err, 99) < 0.6e-3
        assert np.all(got[~valid] == 0)


def test_geometry_image_box_height_and_foreground():
    heights = _box_heights(0.02)
    xyz, _ = _scene(heights, noise=0.1e-3)
    xyz, valid = _holes(xyz, 0.2)
    g = geometry_image(xyz, "xyz", valid)
    assert isinstance(g, GeometryImage)
    assert g.image.shape == (H, W, 3) and g.image.dtype == np.float32
    assert g.foreground.shape == (H, W) and g.foreground.dtype == bool
    assert np.array_equal(g.valid, valid)
    assert g.version == PREPROCESSING_VERSION
    assert abs(g.auto_height_scale - 0.02) < 0.5e-3
    top = heights > 0
    inner = np.zeros_like(top)
    inner[33:63, 31:67] = True
    assert np.all(g.foreground[inner])  # missing points inside the object stay foreground
    assert not g.foreground[_border((H, W), 10)].any()
    iou = (g.foreground & top).sum() / (g.foreground | top).sum()
    assert iou > 0.9
    assert np.all(np.isfinite(g.image))
    assert np.abs(g.height[inner] - 0.02).max() < 1e-3
    assert np.allclose(g.image[inner, 2], g.height[inner] / g.height_scale, atol=1e-5)
    assert g.plane_residual < 0.3e-3


def test_fixed_height_scale_and_clipping():
    xyz, _ = _scene(_box_heights(0.02))
    g = geometry_image(xyz, height_scale=0.01)
    assert g.height_scale == 0.01
    assert np.allclose(g.image[40:60, 40:60, 2], 1.5)  # 2 cm / 1 cm clipped at 1.5
    assert 0.019 < g.auto_height_scale < 0.021
    with pytest.raises(DataError):
        geometry_image(xyz, height_scale=-1.0)


def test_flatten_background():
    xyz, _ = _scene(_box_heights(), noise=0.3e-3)
    g = geometry_image(xyz)
    far = _border((H, W), 15)
    assert np.all(g.image[far] == np.array([0.5, 0.5, 0.0], dtype=np.float32))
    g2 = geometry_image(xyz, flatten_background=False)
    assert not np.all(g2.image[far] == np.array([0.5, 0.5, 0.0], dtype=np.float32))
    assert np.array_equal(g.image[g.foreground], g2.image[g.foreground])


# ---------------------------------------------------------------------------------------------- normals


def test_normals_of_a_plane_equal_the_plane_normal():
    xyz, truth = _scene(np.zeros((H, W)))
    n = surface_normals(xyz)
    assert n.shape == (H, W, 3)
    assert np.allclose(n.reshape(-1, 3), truth[:3], atol=1e-4)
    assert np.allclose(np.linalg.norm(n, axis=2), 1.0, atol=1e-5)


def test_normals_face_the_camera_whatever_the_grid_orientation():
    xyz, truth = _scene(np.zeros((H, W)))
    flipped = xyz[:, ::-1]  # mirrored pixel grid flips the sign of d/du x d/dv
    assert np.allclose(surface_normals(flipped).reshape(-1, 3), truth[:3], atol=1e-4)


def test_flat_table_reads_as_neutral_normal_and_box_sides_tilt():
    # a low box (2 mm): its finite-difference walls (~60 degrees) still face the camera; a much
    # taller step on this synthetic grid would be a wall no real camera sees (it gets flipped)
    xyz, _ = _scene(_box_heights(0.002), tilt_deg=(25.0, 15.0))
    g = geometry_image(xyz, flatten_background=False, normal_sigma=0.0)
    # the table and the box top are parallel to the plane: (0.5, 0.5) whatever the table tilt
    assert np.allclose(g.image[40:56, 38:60, :2], 0.5, atol=1e-3)
    assert np.allclose(g.image[5:20, 5:20, :2], 0.5, atol=1e-3)
    # a wall facing image-left (-u) has n_x < 0; the finite difference straddles it at column 28
    assert g.image[40:56, 27:29, 0].mean() < 0.3
    assert g.image[40:56, 69:71, 0].mean() > 0.7
    # and the top wall (row 30) faces image-up (-v), the bottom one (row 66) image-down
    assert g.image[29:31, 38:60, 1].mean() < 0.3
    assert g.image[65:67, 38:60, 1].mean() > 0.7


def test_hemisphere_normals_point_outward():
    heights = _hemisphere_heights(30)
    xyz, _ = _scene(heights, tilt_deg=(0.0, 0.0))
    g = geometry_image(xyz, normal_sigma=0.0)
    cy, cx = H // 2, W // 2
    assert g.image[cy, cx + 20, 0] > 0.6 and g.image[cy, cx - 20, 0] < 0.4
    assert g.image[cy + 20, cx, 1] > 0.6 and g.image[cy - 20, cx, 1] < 0.4


# ---------------------------------------------------------------------------------------------- fill


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_square_morphology_equals_ndimage(density):
    """The shifted whole-array filters stand in for ndimage's binary erosion, opening and iterated
    dilation (the geometry output must not change with the faster code), edges included; so does the
    scored region's cross dilation."""
    from scipy import ndimage

    from iumad.data.geometry import _square_dilation, _square_erosion, cross_dilation

    rng = np.random.default_rng(1)
    square = np.ones((3, 3), dtype=bool)
    for shape in [(31, 47), (5, 5), (224, 224)]:
        mask = rng.random(shape) < density
        assert np.array_equal(_square_erosion(mask, 3), ndimage.binary_erosion(mask, square))
        assert np.array_equal(_square_dilation(_square_erosion(mask, 3), 3), ndimage.binary_opening(mask, square))
        for it in (1, 2, 3):
            assert np.array_equal(_square_dilation(mask, 2 * it + 1),
                                  ndimage.binary_dilation(mask, square, iterations=it))
        for steps in (0, 1, 8):
            assert np.array_equal(cross_dilation(np.stack([mask, ~mask]), steps)[1],
                                  ndimage.binary_dilation(~mask, iterations=steps) if steps else ~mask)


def test_fill_missing_fills_everything_and_keeps_valid_values():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(40, 50, 3)).astype(np.float32)
    valid = rng.random((40, 50)) > 0.6
    arr[~valid] = np.nan
    out = fill_missing(arr, valid)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert np.all(np.isfinite(out))
    assert np.array_equal(out[valid], arr[valid])
    # every filled value is one of the valid values (nearest neighbour, no blending)
    valid_rows = {tuple(r) for r in arr[valid]}
    assert all(tuple(r) in valid_rows for r in out[~valid])


def test_fill_missing_2d_nearest_and_errors():
    arr = np.zeros((5, 5), np.float32)
    valid = np.zeros((5, 5), bool)
    arr[0, 0], valid[0, 0] = 1.0, True
    arr[4, 4], valid[4, 4] = 2.0, True
    out = fill_missing(arr, valid)
    assert out[1, 1] == 1.0 and out[3, 3] == 2.0
    assert np.array_equal(fill_missing(arr, np.ones((5, 5), bool)), arr)
    with pytest.raises(DataError):
        fill_missing(arr, np.zeros((5, 5), bool))
    with pytest.raises(DataError):
        fill_missing(arr, np.ones((4, 5), bool))


# ---------------------------------------------------------------------------------------------- depth


def _depth_scene(f: float, box_h: float = 0.015) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast depth of a tilted plane with a raised box top through a pinhole at the image centre."""
    e1, e2, n, origin = _frame((10.0, -8.0))
    d = -float(n @ origin)
    v, u = np.mgrid[0:H, 0:W].astype(float)
    rays = np.stack([(u - (W - 1) / 2) / f, (v - (H - 1) / 2) / f, np.ones_like(u)], axis=2)
    nr = rays @ n
    top = np.zeros((H, W), bool)
    top[32:64, 30:66] = True
    target = np.where(top, box_h, 0.0)  # n . p + d = target along each ray: p = z * ray
    z = (target - d) / nr
    return z.astype(np.float32), top


def test_depth_input_goes_through_the_same_path():
    f = 700.0
    depth, top = _depth_scene(f)
    depth[5, 7] = 0.0  # missing
    g = geometry_image(depth, "depth", depth_focal_px=f)
    assert g.image.shape == (H, W, 3)
    assert not g.valid[5, 7] and g.valid.sum() == H * W - 1
    assert g.plane_residual < 1e-6
    assert np.abs(g.height[top] - 0.015).max() < 1e-5
    assert np.abs(g.height[_border((H, W), 10)]).max() < 1e-5
    assert (g.foreground & top).sum() / (g.foreground | top).sum() > 0.9
    # a nominal focal length keeps the table planar (residual ~0) and heights close
    g2 = geometry_image(depth, "depth")
    assert g2.plane_residual < 1e-6
    assert abs(np.median(g2.height[top]) - 0.015) < 1e-3
    assert np.array_equal(g2.foreground, g.foreground)


def test_depth_to_xyz_and_shape_errors():
    depth = np.full((10, 12), 0.5, np.float32)
    depth[0, 0] = np.nan
    xyz, valid = depth_to_xyz(depth[:, :, None], focal_px=100.0)
    assert xyz.shape == (10, 12, 3) and not valid[0, 0] and valid.sum() == 119
    assert np.all(xyz[0, 0] == 0) and np.allclose(xyz[valid][:, 2], 0.5)
    with pytest.raises(DataError):
        geometry_image(np.ones((10, 12, 3), np.float32), "depth")
    with pytest.raises(DataError):
        depth_to_xyz(depth, focal_px=-1.0)


# ---------------------------------------------------------------------------------------------- errors


def test_nan_and_inf_are_treated_as_missing():
    xyz, _ = _scene(_box_heights(), noise=0.1e-3)
    xyz[10:14, 10:14] = np.nan
    xyz[50, 50, 1] = np.inf
    xyz[3, 80] = (0.0, 0.0, 0.0)
    g = geometry_image(xyz)
    assert not g.valid[10:14, 10:14].any() and not g.valid[50, 50] and not g.valid[3, 80]
    assert g.valid.sum() == H * W - 18
    assert np.all(np.isfinite(g.image)) and np.all(np.isfinite(g.height))
    plane = fit_background_plane(xyz)
    assert np.all(np.isfinite(plane))


@pytest.mark.parametrize("fill", [0.0, np.nan])
def test_all_missing_raises_data_error_naming_the_source(fill):
    xyz = np.full((H, W, 3), fill, np.float32)
    with pytest.raises(DataError, match=r"cable_gland/xyz/007\.tiff"):
        geometry_image(xyz, source="cable_gland/xyz/007.tiff")
    with pytest.raises(DataError, match="depth/3.png"):
        geometry_image(np.full((H, W), fill, np.float32), "depth", source="depth/3.png")
    with pytest.raises(DataError):
        fit_background_plane(xyz)


def test_bad_shapes_and_kind_raise_data_error():
    with pytest.raises(DataError, match="HxWx3"):
        geometry_image(np.ones((H, W, 2), np.float32), source="a.tiff")
    with pytest.raises(DataError, match="HxWx3"):
        geometry_image(np.ones((H, W), np.float32), "xyz")
    with pytest.raises(DataError):
        geometry_image(np.ones((2, 2, 3), np.float32))
    with pytest.raises(DataError, match="kind"):
        geometry_image(np.ones((H, W, 3), np.float32), "mesh")
    with pytest.raises(DataError, match="valid mask"):
        geometry_image(np.ones((H, W, 3), np.float32), "xyz", np.ones((H, W + 1), bool))


def test_valid_mask_argument_is_respected():
    xyz, _ = _scene(_box_heights())
    valid = np.ones((H, W), bool)
    valid[:, :5] = False
    assert np.array_equal(geometry_image(xyz, "xyz", valid).valid, valid)


def test_preprocessing_key_names_version_and_parameters():
    k = preprocessing_key()
    assert k.startswith(PREPROCESSING_VERSION)
    assert preprocessing_key(height_scale=0.04) != k
    assert preprocessing_key(depth_focal_px=700) != k
    assert preprocessing_key(normal_sigma=0.0) != k
    assert preprocessing_key(height_scale=0.04) == preprocessing_key(height_scale=0.04)
    assert preprocessing_key(normal_sigma=1.0, flatten_background=True, height_scale=None) == k
    assert preprocessing_key(depth_focal_px=700) == preprocessing_key(depth_focal_px=700.0)
    assert preprocessing_key(flatten_background=False) != k
    with pytest.raises(TypeError):
        preprocessing_key(no_such_option=1)


def test_sample_geometry_image_uses_kind_valid_and_source():
    xyz, _ = _scene(_box_heights())
    s = Sample(class_name="c", label="good", geometry=xyz, geometry_kind="xyz", valid=np.ones((H, W), bool))
    assert sample_geometry_image(s).image.shape == (H, W, 3)
    bad = Sample(
        class_name="c",
        label="good",
        geometry=np.zeros((H, W), np.float32),
        geometry_kind="depth",
        valid=np.zeros((H, W), bool),
        paths={"geometry": Path("/data/c/depth/0.png")},
    )
    with pytest.raises(DataError, match="/data/c/depth/0.png"):
        sample_geometry_image(bad)


# ---------------------------------------------------------------------------------------------- real data


def _shared() -> Path:
    env = os.environ.get("IUMAD_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


REAL = _shared() / "data" / "mvtec3d-cable_gland-224" / "cable_gland"


@pytest.mark.skipif(
    not (REAL / "train" / "good" / "xyz" / "000.tiff").is_file(),
    reason=f"shared MVTec 3D-AD cable_gland sample not found under {REAL} (set IUMAD_SHARED)",
)
@pytest.mark.parametrize("rel", ["train/good/xyz/000.tiff", "test/hole/xyz/000.tiff"])
def test_real_mvtec_sample(rel):
    tifffile = pytest.importorskip("tifffile")
    path = REAL / rel
    xyz = tifffile.imread(path)
    g = geometry_image(xyz, source=str(path))
    assert g.image.shape == xyz.shape and np.all(np.isfinite(g.image))
    assert 0.08 < g.foreground.mean() < 0.4
    border = _border(g.valid.shape, 15) & g.valid
    resid = np.abs(g.height[border])
    assert np.median(resid) < 1e-3
    assert g.plane_residual < 2e-3
    # a cable gland lying on its side stands ~4 cm above the table
    assert 0.02 < g.auto_height_scale < 0.06
    assert g.image[g.foreground, 2].mean() > 0.3
    gt_path = path.parent.parent / "gt" / path.name.replace(".tiff", ".png")
    if gt_path.is_file():
        from PIL import Image

        gt = np.asarray(Image.open(gt_path)) > 0
        # the foreground must not erase geometric defects
        assert (g.foreground & gt).sum() >= 0.9 * gt.sum()
