"""train.data.images: image folders and source/target pairs, captions, resize/crop, unreadable files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.images import ImageFolder, ImageReadError
from train.loader import batches


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def gradient(h, w):
    """An RGB image whose red channel encodes the column and green the row (so crops are checkable)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return a


def test_single_folder_resizes_crops_the_centre_and_reads_captions(tmp_path):
    write(tmp_path / "b.png", gradient(20, 40))  # wide: the centre half of the columns survives
    write(tmp_path / "a.jpg", np.full((8, 8, 3), 255, np.uint8))
    (tmp_path / "b.txt").write_text("a gradient\n")
    (tmp_path / "notes.md").write_text("not an image")
    ds = ImageFolder(tmp_path, 10)
    assert len(ds) == 2 and ds.names == ["a", "b"]
    a, b = ds[0], ds[1]
    assert a["caption"] == "" and b["caption"] == "a gradient"
    assert a["image"].shape == b["image"].shape == (3, 10, 10) and a["image"].dtype == torch.float32
    assert torch.allclose(a["image"], torch.ones(3, 10, 10), atol=1e-6)  # white -> 1 in [-1, 1]
    red = (b["image"][0, 5] + 1) / 2  # the centre crop keeps columns about 10..29 of 40
    assert 0.2 < red[0] < 0.3 and 0.7 < red[-1] < 0.8 and torch.all(red[1:] >= red[:-1])
    assert ImageFolder(tmp_path, (6, 12), crop=False)[1]["image"].shape == (3, 6, 12)


def test_pairs_match_by_name_with_a_grey_sketch_source_in_unit_range(tmp_path):
    for name in ("x", "y"):
        write(tmp_path / "source" / f"{name}.png", np.full((16, 16), 255, np.uint8))
        write(tmp_path / "target" / f"{name}.png", gradient(16, 16))
    (tmp_path / "target" / "y.txt").write_text("why")
    ds = ImageFolder(tmp_path, 8, source_mode="L")
    assert ds.pairs and len(ds) == 2
    item = ds[1]
    assert item["source"].shape == (1, 8, 8) and torch.allclose(item["source"], torch.ones(1, 8, 8))
    assert item["target"].shape == (3, 8, 8) and item["target"].min() < 0 and item["caption"] == "why"
    batch = next(batches(ds, 2, seed=0))  # the loader stacks tensors and lists the captions
    assert batch["source"].shape == (2, 1, 8, 8) and sorted(batch["caption"]) == ["", "why"]


def test_clear_errors_for_unreadable_images_unpaired_names_and_empty_folders(tmp_path):
    write(tmp_path / "good.png", gradient(8, 8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    ds = ImageFolder(tmp_path, 8)
    with pytest.raises(ImageReadError, match="cannot read image .*broken.png"):
        ds[ds.names.index("broken")]
    write(tmp_path / "p" / "source" / "one.png", gradient(8, 8))
    write(tmp_path / "p" / "target" / "two.png", gradient(8, 8))
    with pytest.raises(ValueError, match=r"no partner .*source/one.*target/two"):
        ImageFolder(tmp_path / "p", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty", 8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing", 8)
