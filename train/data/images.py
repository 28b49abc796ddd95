"""Image-folder datasets for training: one folder of images, or img2img pairs.

    photos/                     pairs/
      cat.png  cat.txt            source/cat.png            (e.g. the scribble, or the degraded image)
      dog.jpg  dog.txt            target/cat.png  cat.txt   (the image to learn; the caption beside it)

An optional caption is the `.txt` file with the image's name beside it (for pairs: beside the target, else beside
the source). Each image is resized so its shorter side is `size` and centre-cropped to `size` x `size` (or resized
to exactly (height, width) with `crop=False`), and returned as a float32 (C, H, W) tensor: in [-1, 1] for images
(what the autoencoders take), in [0, 1] for sources read in mode "L" (a sketch hint). Reading is lazy; a file that
cannot be decoded raises `ImageReadError` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MODES = ("RGB", "L")


class ImageReadError(ValueError):
    """An image file that cannot be read or decoded."""


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("image-folder datasets need Pillow: pip install 'zoo[image]' (or pip install pillow)") from e
    return Image


def list_images(folder: Path) -> dict[str, Path]:
    """{name without extension: path} of the images directly in `folder`; two files with one name are an error."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in EXTENSIONS:
            if p.stem in found:
                raise ValueError(f"{folder} holds two images named {p.stem!r}: {found[p.stem].name} and {p.name}")
            found[p.stem] = p
    return found


def read_image(path: Path, size: tuple[int, int], crop: bool, mode: str = "RGB") -> Tensor:
    """The image at `path` as (C, H, W) float32 in [0, 1], C = 3 (RGB) or 1 (L), resized (and centre-cropped)."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
    except Exception as e:  # PIL raises several types for bad files: name the file whatever the reason
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    height, width = size
    if crop:  # scale the shorter side to fit, then cut the centre
        scale = max(height / im.height, width / im.width)
        w, h = max(width, round(im.width * scale)), max(height, round(im.height * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=None)
        left, top = (w - width) // 2, (h - height) // 2
        im = im.crop((left, top, left + width, top + height))
    elif (im.width, im.height) != (width, height):
        im = im.resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)
    x = torch.from_numpy(arr)
    return (x[None] if x.ndim == 2 else x.permute(2, 0, 1)).contiguous()  # (C, H, W)


class ImageFolder:
    """A map-style dataset over an image folder (or `source/` + `target/` pairs), for `train.fit`.

    Items: {"image": (C, H, W) in [-1, 1], "caption": str} for one folder; {"source": ..., "target": ...,
    "caption": str} for pairs, matched by file name (a name in only one of the folders is an error). `size`: an int
    (square) or (height, width). `mode` / `source_mode`: "RGB" or "L"; a source in mode "L" stays in [0, 1] (a
    sketch hint), every other image is mapped to [-1, 1]. `caption` is "" where no `.txt` exists.
    """

    def __init__(self, root: str | Path, size: int | tuple[int, int], *, crop: bool = True, mode: str = "RGB",
                 source_mode: str | None = None, pairs: bool | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.size) != 2 or not all(isinstance(s, int) and s > 0 for s in self.size):
            raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
        self.mode, self.source_mode = mode, source_mode or mode
        for m in (self.mode, self.source_mode):
            if m not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {m!r}")
        self.crop = crop
        has_pairs = (self.root / "source").is_dir() and (self.root / "target").is_dir()
        self.pairs = has_pairs if pairs is None else pairs
        if self.pairs and not has_pairs:
            raise FileNotFoundError(f"pairs need {self.root}/source/ and {self.root}/target/")
        if self.pairs:
            sources, targets = list_images(self.root / "source"), list_images(self.root / "target")
            alone = sorted(set(sources) ^ set(targets))
            if alone:
                where = ["source/" + n if n in sources else "target/" + n for n in alone[:5]]
                raise ValueError(f"{self.root}: {len(alone)} images have no partner of the same name in the other "
                                 f"folder: {where}")
            self.names = sorted(targets)
            self.files = [(sources[n], targets[n]) for n in self.names]
        else:
            images = list_images(self.root)
            self.names = sorted(images)
            self.files = [(images[n],) for n in self.names]
        if not self.files:
            raise ValueError(f"no images ({', '.join(EXTENSIONS)}) in {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, i: int) -> str:
        for p in reversed(self.files[i]):  # the target's caption first
            txt = p.with_suffix(".txt")
            if txt.is_file():
                return txt.read_text(encoding="utf-8").strip()
        return ""

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        files = self.files[i]
        if not self.pairs:
            return {"image": read_image(files[0], self.size, self.crop, self.mode) * 2 - 1, "caption": self.caption(i)}
        source = read_image(files[0], self.size, self.crop, self.source_mode)
        if self.source_mode != "L":
            source = source * 2 - 1
        target = read_image(files[1], self.size, self.crop, self.mode) * 2 - 1
        return {"source": source, "target": target, "caption": self.caption(i)}


__all__ = ["EXTENSIONS", "ImageFolder", "ImageReadError", "list_images", "read_image"]
