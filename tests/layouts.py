"""Small classes in the MVTec AD, MVTec AD 2, MVTec LOCO, VisA and described-folders layouts, written by
the tests themselves (no dataset is downloaded). Defect images carry a bright square; their masks mark
it with `mask_value` (MVTec uses 255, VisA small ids), as 8-bit or 16-bit PNGs."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def image(seed: int, size: int = SIZE, gray: bool = False, defect: bool = False) -> np.ndarray:
    """A textured part; a defect adds a bright square at (4:12, 4:12)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:size, 0:size]
    base = (96 + 40 * np.sin(u / 3.0) + 30 * np.cos(v / 4.0))[..., None] + rng.normal(0, 6, (size, size, 3))
    if defect:
        base[4:12, 4:12] = 250
    arr = np.clip(base, 0, 255).astype(np.uint8)
    return arr[..., 0] if gray else arr


def mask(size: int = SIZE, value: int = 255, bits: int = 8, box: tuple[int, int, int, int] = (4, 12, 4, 12)
         ) -> np.ndarray:
    out = np.zeros((size, size), np.uint16 if bits == 16 else np.uint8)
    y0, y1, x0, x1 = box
    out[y0:y1, x0:x1] = value
    return out


def save(path: Path, arr: np.ndarray, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def mvtec_ad_class(root: Path, name: str = "bottle", *, n_train: int = 6, n_good: int = 2,
                   defects: tuple[str, ...] = ("broken", "crack"), n_defect: int = 2, gray: bool = False,
                   mask_value: int = 255, mask_bits: int = 8, with_masks: bool = True, size: int = SIZE) -> Path:
    """<name>/train/good, test/{good,<defects>}, ground_truth/<defect>/<id>_mask.png."""
    cls = root / name
    for i in range(n_train):
        save(cls / "train" / "good" / f"{i:03d}.png", image(i, size, gray))
    for i in range(n_good):
        save(cls / "test" / "good" / f"{i:03d}.png", image(100 + i, size, gray))
    for d, defect in enumerate(defects):
        for i in range(n_defect):
            save(cls / "test" / defect / f"{i:03d}.png", image(200 + 10 * d + i, size, gray, defect=True))
            if with_masks:
                save(cls / "ground_truth" / defect / f"{i:03d}_mask.png", mask(size, mask_value, mask_bits))
    (cls / "license.txt").write_text("test fixture")
    return cls


def mvtec_ad2_class(root: Path, name: str = "vial", *, n_train: int = 6, n_val: int = 2, n_good: int = 2,
                    n_bad: int = 3, size: int = SIZE) -> Path:
    """<name>/{train,validation}/good, test_public/{good,bad,ground_truth/bad}, test_private/ (unlabelled)."""
    cls = root / name
    for i in range(n_train):
        save(cls / "train" / "good" / f"{i:03d}_regular.png", image(i, size))
    for i in range(n_val):
        save(cls / "validation" / "good" / f"{i:03d}_regular.png", image(50 + i, size))
    for i in range(n_good):
        save(cls / "test_public" / "good" / f"{i:03d}_regular.png", image(100 + i, size))
    for i in range(n_bad):
        save(cls / "test_public" / "bad" / f"{i:03d}_regular.png", image(200 + i, size, defect=True))
        save(cls / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png", mask(size))
    save(cls / "test_private" / "000_regular.png", image(300, size))
    return cls


def loco_class(root: Path, name: str = "juice_bottle", *, n_train: int = 6, n_val: int = 2, n_good: int = 2,
               size: int = SIZE) -> Path:
    """<name>/{train,validation}/good, test/{good,logical_anomalies,structural_anomalies},
    ground_truth/<kind>/<id>/000.png; logical 000 has two masks (two boxes) to merge, valued 255 and 100."""
    cls = root / name
    for i in range(n_train):
        save(cls / "train" / "good" / f"{i:03d}.png", image(i, size))
    for i in range(n_val):
        save(cls / "validation" / "good" / f"{i:03d}.png", image(50 + i, size))
    for i in range(n_good):
        save(cls / "test" / "good" / f"{i:03d}.png", image(100 + i, size))
    for k, kind in enumerate(("logical_anomalies", "structural_anomalies")):
        for i in range(2):
            save(cls / "test" / kind / f"{i:03d}.png", image(200 + 10 * k + i, size, defect=True))
            save(cls / "ground_truth" / kind / f"{i:03d}" / "000.png", mask(size))
    save(cls / "ground_truth" / "logical_anomalies" / "000" / "001.png", mask(size, 100, box=(20, 24, 20, 30)))
    return cls


def visa_dataset(root: Path, names: tuple[str, ...] = ("candle",), *, n_train: int = 6, n_good: int = 2,
                 n_anomaly: int = 3, size: int = SIZE) -> Path:
    """<root>/<name>/Data/Images/{Normal,Anomaly}/*.JPG, Data/Masks/Anomaly/*.png (value 1), and
    <root>/split_csv/1cls.csv listing them (paths relative to root)."""
    rows = []
    for name in names:
        data = root / name / "Data"
        for i in range(n_train + n_good):
            rel = f"{name}/Data/Images/Normal/{i:04d}.JPG"
            save(root / rel, image(i, size), quality=95)
            rows.append([name, "train" if i < n_train else "test", "normal", rel, ""])
        for i in range(n_anomaly):
            rel = f"{name}/Data/Images/Anomaly/{i:03d}.JPG"
            save(root / rel, image(200 + i, size, defect=True), quality=95)
            save(data / "Masks" / "Anomaly" / f"{i:03d}.png", mask(size, value=1 + i % 2))
            rows.append([name, "test", "anomaly", rel, f"{name}/Data/Masks/Anomaly/{i:03d}.png"])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def described_folders(root: Path, *, n_train: int = 6, n_good: int = 2, n_abnormal: int = 3,
                      with_masks: bool = True, size: int = SIZE) -> dict[str, Path]:
    """normal/, normal_test/, abnormal/ and masks/ folders under `root` (as --normal ... would name them)."""
    out = {"normal": root / "normal", "normal_test": root / "normal_test", "abnormal": root / "abnormal"}
    for i in range(n_train):
        save(out["normal"] / f"n{i:03d}.png", image(i, size))
    for i in range(n_good):
        save(out["normal_test"] / f"t{i:03d}.png", image(100 + i, size))
    for i in range(n_abnormal):
        save(out["abnormal"] / f"a{i:03d}.png", image(200 + i, size, defect=True))
        if with_masks:
            save(root / "masks" / f"a{i:03d}_mask.png", mask(size))
    if with_masks:
        out["masks"] = root / "masks"
    return out
