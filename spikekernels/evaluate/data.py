"""Evaluation data: an ImageFolder-layout folder read with pillow, or scikit-learn's digits.

No torchvision (no build of it matches the CPU torch used here). A folder follows
torchvision's ``ImageFolder`` layout: one subfolder per class, classes indexed in sorted
order, files with an image extension (``IMAGE_EXTENSIONS``) are the samples, others are
ignored. The eval transform is the usual ViT one: resize the shorter side to
``round(img_size / crop_pct)`` (bicubic), center-crop ``img_size``, scale to [0, 1],
normalise by ``mean``/``std`` (ImageNet's for 3 channels).

**Unreadable images are skipped and counted**: a file with an image extension that pillow
cannot decode is left out of every metric; results.json reports ``skipped_images`` (count and
paths). A dataset with no readable image is an error.

``--data digits``: scikit-learn's bundled 8x8 digits (no download), split and standardised
exactly as ``python/demo.py`` does (1437 train / 360 test, stratified, seed 0); the evaluation
set is the test split, calibration uses the training split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DigitsDataset",
    "ImageFolderDataset",
    "batches",
    "digits_split",
    "subset_indices",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_SEED = 0


def digits_split(test_fraction: float = 0.2, seed: int = DIGITS_SEED):
    """``(x_train, y_train, x_test, y_test)``: digits as ``[N, 1, 8, 8]`` float32 standardised
    by the training mean/std, int64 labels; the same split and scaling as python/demo.py."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=y
    )
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test]


class DigitsDataset(Dataset):
    """Digits test split (``split="test"``, the evaluation set) or training split."""

    def __init__(self, split: str = "test") -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x_train, y_train, x_test, y_test = digits_split()
        self.images, self.labels = (x_test, y_test) if split == "test" else (x_train, y_train)
        self.classes = [str(c) for c in range(10)]
        self.description = f"digits ({split} split)"

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), None


@dataclass(frozen=True)
class _Transform:
    img_size: int
    in_chans: int
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB" if self.in_chans == 3 else "L")
        w, h = image.size
        short = max(1, round(self.img_size / self.crop_pct))
        if min(w, h) != short:
            scale = short / min(w, h)
            size = (max(short, round(w * scale)), max(short, round(h * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            w, h = image.size
        left, top = (w - self.img_size) // 2, (h - self.img_size) // 2
        image = image.crop((left, top, left + self.img_size, top + self.img_size))
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = x.reshape(self.img_size, self.img_size, -1).permute(2, 0, 1).to(torch.float32) / 255
        mean = torch.tensor(self.mean).reshape(-1, 1, 1)
        std = torch.tensor(self.std).reshape(-1, 1, 1)
        return (x - mean) / std


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` read with pillow; items ``(image [C, H, W], label, None)``,
    or ``(None, label, path)`` for a file pillow cannot decode (skipped by ``batches``)."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        img_size: int,
        in_chans: int,
        crop_pct: float = 0.875,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        root = os.fspath(root)
        if not os.path.exists(root):
            raise FileNotFoundError(f"dataset folder not found: {root}")
        if not os.path.isdir(root):
            raise ValueError(f"dataset {root} is not a folder (expected ImageFolder layout)")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.root = root
        self.classes = sorted(
            d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith(".")
        )
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            for dirpath, dirnames, filenames in sorted(os.walk(folder, followlinks=True)):
                dirnames.sort()
                for f in sorted(filenames):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), label))
        if not self.samples:
            raise ValueError(
                f"dataset folder {root} is empty: expected ImageFolder layout (one subfolder "
                f"per class holding {', '.join(IMAGE_EXTENSIONS)} files); found "
                f"{len(self.classes)} class folder(s) and no image"
            )
        mean = _per_channel(mean, IMAGENET_MEAN if in_chans == 3 else (0.5,), in_chans, "mean")
        std = _per_channel(std, IMAGENET_STD if in_chans == 3 else (0.5,), in_chans, "std")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.transform = _Transform(img_size, in_chans, crop_pct, mean, std)
        self.description = f"image folder {root} ({len(self.classes)} classes)"

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.transform.in_chans, self.transform.img_size, self.transform.img_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                image.load()
                return self.transform(image), label, None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            # SyntaxError: what some pillow plugins raise for a damaged header.
            return None, label, os.path.relpath(path, self.root)


def _per_channel(values, default, channels: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in (default if values is None else values))
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{name} needs 1 or {channels} values, got {len(values)}")
    return values


def subset_indices(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """All of ``range(n)``, or ``limit`` of them: a seeded random choice, in ascending order
    (so a limited ImageFolder run still spans every class)."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    return sorted(chosen.tolist())


def _collate(items):
    images = [x for x, _, _ in items if x is not None]
    labels = [y for x, y, _ in items if x is not None]
    skipped = [p for x, _, p in items if x is None]
    if images:
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64), skipped
    return None, None, skipped


def batches(dataset: Dataset, indices: Sequence[int], batch_size: int, workers: int = 0):
    """Iterate ``(images [b, C, H, W] or None, labels [b] or None, skipped paths)`` over
    ``dataset[indices]`` in order, ``batch_size`` items at a time (fewer images where some
    could not be read)."""
    subset = torch.utils.data.Subset(dataset, list(indices))
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
