"""checkpoints_convert.io: safetensors round trips, containers, unsafe pickles, corrupt files (fuzzed)."""
from __future__ import annotations

import json
import pickle
import random
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

from checkpoints_convert.io import CheckpointError, load_file, read_header, save_file


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=g)
    q, k, v = torch.split(w, 2)  # views sharing one storage, as the key maps return
    return {"q": q, "k": k, "v": v, "t": w.T, "h": torch.randn(3, generator=g).half(),
            "b": torch.randn(2, 2, generator=g).bfloat16(), "f8": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
            "empty": torch.zeros(0, 3), "step": torch.tensor(7), "mask": torch.tensor([True, False])}


class Payload:  # stands for any class a malicious pickle would import and run
    pass


def _valid_file(tmp_path):
    path = tmp_path / "ok.safetensors"
    st_save({"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}, str(path))
    return path


def test_save_file_writes_shared_views_and_every_dtype_bit_exactly(tmp_path):
    sd = _tensors()
    save_file(sd, tmp_path / "x.safetensors", {"family": "flux"})
    ours, theirs = load_file(tmp_path / "x.safetensors"), st_load(str(tmp_path / "x.safetensors"))
    for k, t in sd.items():
        for got in (ours[k], theirs[k]):  # the reference reader agrees: the file is standard safetensors
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    assert ours.metadata["family"] == "flux" and ours.metadata["format"] == "pt"
    assert set(ours.metadata["dtype"].split(",")) == {"F32", "F16", "BF16", "F8_E4M3", "I64", "BOOL"}


def test_load_file_maps_lazily_and_keeps_the_file_untouched(tmp_path):
    path = _valid_file(tmp_path)
    before = path.read_bytes()
    sd = load_file(path)
    sd["a"].mul_(0)  # a private mapping: writing to a loaded tensor never reaches the file
    assert path.read_bytes() == before
    assert sd.paths == (path.resolve(),)


def test_save_file_refuses_to_overwrite_its_input_and_leaves_no_temp_file(tmp_path):
    path = _valid_file(tmp_path)
    sd = load_file(path)
    with pytest.raises(CheckpointError, match="refusing to overwrite the input"):
        save_file(sd, path)
    with pytest.raises(CheckpointError, match="refusing to overwrite the input"):
        save_file(dict(sd), path, source=path)
    save_file(sd, tmp_path / "copy.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.safetensors", "ok.safetensors"]


def test_save_file_crash_midway_leaves_no_output(tmp_path):
    class Boom(dict):
        def values(self):
            yield torch.ones(2)
            raise KeyboardInterrupt  # a crash between two tensors

    with pytest.raises(KeyboardInterrupt):
        save_file(Boom(a=torch.ones(2), b=torch.ones(2)), tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_pickles_load_only_as_weights_and_containers_unwrap(tmp_path):
    torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(2)}, "global_step": 3}, tmp_path / "m.ckpt")
    assert list(load_file(tmp_path / "m.ckpt")) == ["model.diffusion_model.x"]
    torch.save({"x": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_file(tmp_path / "legacy.pt")["x"], torch.ones(2))

    torch.save({"x": torch.ones(2), "evil": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match=r"refused.*arbitrary code.*GLOBAL.*Payload.*safetensors"):
        load_file(tmp_path / "unsafe.pt")
    (tmp_path / "garbage.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_file(tmp_path / "garbage.bin")


def test_ema_weights_on_request(tmp_path):
    sd = {"model.diffusion_model.out.0.weight": torch.ones(2),
          "model_ema.diffusion_modelout0weight": torch.full((2,), 5.0),
          "model_ema.decay": torch.tensor(0.999), "first_stage_model.w": torch.ones(1)}
    torch.save({"state_dict": sd}, tmp_path / "ldm.ckpt")
    got = load_file(tmp_path / "ldm.ckpt", ema=True)
    assert sorted(got) == ["first_stage_model.w", "model.diffusion_model.out.0.weight"]
    assert torch.equal(got["model.diffusion_model.out.0.weight"], torch.full((2,), 5.0))
    torch.save({"state_dict": {"x": torch.ones(1)}, "state_dict_ema": {"x": torch.zeros(1)}}, tmp_path / "p.pth")
    assert load_file(tmp_path / "p.pth", ema=True)["x"].item() == 0 and load_file(tmp_path / "p.pth")["x"].item() == 1
    with pytest.raises(CheckpointError, match="EMA weights requested but none"):
        load_file(_valid_file(tmp_path), ema=True)


def test_sharded_index_and_model_folder(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    st_save({"a": torch.ones(2)}, str(folder / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    st_save({"b": torch.zeros(3)}, str(folder / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                                            "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    for src in (folder, folder / "diffusion_pytorch_model.safetensors.index.json"):
        sd = load_file(src)
        assert sorted(sd) == ["a", "b"] and len(sd.paths) == 2
    index["weight_map"]["c"] = "missing.safetensors"
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard listed by the index does not exist"):
        load_file(folder)


@pytest.mark.parametrize("header, why", [
    (b"\xff\xfe not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"[" * 100_000, "not valid JSON"),  # nesting deep enough to exhaust the JSON parser's recursion
    (b'{"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}', "no known dtype"),
    (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "bad shape"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "needs 8 bytes"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4000]}}', "do not fit"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "overlap or gap"),
    (b'{"__metadata__": {"x": 1}}', "__metadata__"),
])
def test_corrupt_headers_raise_a_clear_checkpoint_error(tmp_path, header, why):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=why):
        load_file(path)


def test_fuzzed_files_raise_our_error_never_crash(tmp_path):
    rng = random.Random(0)
    good = _valid_file(tmp_path).read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    path = tmp_path / "fuzz.safetensors"
    for i in range(300):
        kind = i % 4
        if kind == 0:  # random bytes, random length
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        elif kind == 1:  # truncated anywhere
            data = good[: rng.randrange(0, len(good))]
        elif kind == 2:  # a wrong header length
            data = struct.pack("<Q", rng.choice([0, n - 1, n + 1, len(good), 2**63, rng.getrandbits(64)])) + good[8:]
        else:  # a few header bytes mutated
            data = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                data[8 + rng.randrange(n)] = rng.getrandbits(8)
            data = bytes(data)
        path.write_bytes(data)
        try:
            sd = load_file(path)
        except CheckpointError:
            continue
        # only a mutation that keeps the header consistent may load, and then every tensor lies inside the file
        assert kind == 3, f"case {i} ({kind}) loaded"
        header, _, start = read_header(path)
        assert sum(t.numel() * t.element_size() for t in sd.values()) == len(data) - start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux")
def test_release_drops_file_pages_and_data_stays_readable(tmp_path):
    big = torch.arange(16 * 2**20, dtype=torch.float32)  # 64 MB
    save_file({"big": big, "small": torch.ones(3)}, tmp_path / "big.safetensors")
    del big
    sd = load_file(tmp_path / "big.safetensors")
    total = sd["big"].sum().item()  # reads every page
    before = _rss()
    sd.release()
    assert before - _rss() > 32 * 2**20  # the pages left this process
    assert sd["big"].sum().item() == total  # and come back from the file when read again
    anon = torch.ones(2**20)
    sd.release(anon)  # not inside a file mapping: left alone (MADV_DONTNEED would zero anonymous memory)
    assert anon.sum().item() == 2**20


def test_metadata_records_family_layout_and_dtype(tmp_path):
    import zoo

    save_file({k: v.half() for k, v in zoo.build("tiny-flux", device="cpu").state_dict().items()},
              tmp_path / "f.safetensors")
    meta = load_file(tmp_path / "f.safetensors").metadata
    assert (meta["zoo_family"], meta["zoo_layout"], meta["dtype"], meta["format"]) == ("flux", "official", "F16", "pt")


def test_save_file_transform_casts_one_tensor_at_a_time(tmp_path):
    seen = []

    def half(t):
        seen.append(t.device.type)
        return t.half()

    sd = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    save_file(sd, tmp_path / "h.safetensors", transform=half)
    got = load_file(tmp_path / "h.safetensors")
    assert all(torch.equal(got[k], sd[k].half()) for k in sd) and got.metadata["dtype"] == "F16"
    assert seen == ["meta", "meta", "cpu", "cpu"]  # planned on meta twins, converted only while writing


def test_a_plain_pickle_is_refused_plainly_with_no_torch_warning(tmp_path):
    import warnings

    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump({"w": [1.0, 2.0], "f": print}, f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked torch UserWarning would fail here
        with pytest.raises(CheckpointError, match=r"this pickle would run code; refused"):
            load_file(tmp_path / "plain.pt")


def test_a_missing_destination_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'nope'}: the destination folder does not exist"):
        save_file({"w": torch.ones(2)}, tmp_path / "nope" / "x.safetensors")


def test_atomic_path_replaces_only_a_complete_file_and_leaves_no_temporary(tmp_path):
    from checkpoints_convert import atomic_path

    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # formats chosen by suffix still see it
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
