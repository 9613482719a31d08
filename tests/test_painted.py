"""Painted defects: the tuning set for real classes (benchmarks/tune_real.py)."""

import numpy as np
import pytest

from iumad.data.painted import FAMILIES, paint_defect
from iumad.data.region import textured_region


def _textured(seed: int) -> np.ndarray:
    """A grey background with camera noise and a textured square in the middle (the "object")."""
    rng = np.random.default_rng(seed)
    img = rng.integers(57, 63, size=(96, 128, 3)).astype(np.uint8)
    img[32:64, 48:80] = rng.integers(40, 220, size=(32, 32, 3))
    return img


@pytest.mark.parametrize("family", FAMILIES)
def test_paint_changes_only_the_mask_and_lands_where_allowed(family):
    image, donor = _textured(0), _textured(1)
    where = np.zeros(image.shape[:2], bool)
    where[40:56, 56:72] = True
    out, mask = paint_defect(image, donor, np.random.default_rng(3), family, (0.08, 0.12), where)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert mask.any() and mask.mean() < 0.2
    assert np.array_equal(out[~mask], image[~mask])  # nothing outside the defect moves
    assert (out[mask] != image[mask]).any()
    assert (mask & where).any()  # the defect sits on the allowed region
    again, mask2 = paint_defect(image, donor, np.random.default_rng(3), family, (0.08, 0.12), where)
    assert np.array_equal(again, out) and np.array_equal(mask2, mask)  # the generator decides everything


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown defect family"):
        paint_defect(_textured(0), _textured(1), np.random.default_rng(0), "rust")


def test_textured_region_finds_the_object():
    region = textured_region([_textured(s) for s in range(4)])
    assert region[36:60, 52:76].all()  # inside the square, away from its edge
    assert not region[:12].any() and not region[:, :24].any()  # plain background
