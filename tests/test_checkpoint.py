"""Lazy checkpoints: listing matches safetensors' own reader, without reading any data."""

from __future__ import annotations

import json
import shutil
import struct
import threading

import pytest
import torch
from conftest import ARCHS, make_tiny
from safetensors import safe_open

import splice.checkpoint
from splice import SpliceError, open_checkpoint
from splice.dtypes import to_torch


def reference_tensors(folder) -> dict[str, torch.Tensor]:
    """All tensors of a folder, read by the safetensors library (the independent reader)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[k] = st.get_tensor(k)
    return out


@pytest.mark.parametrize("model_type", ARCHS)
def test_listing_and_loading_match_safetensors(tiny_models, model_type):
    ref = reference_tensors(tiny_models[model_type])
    ckpt = open_checkpoint(tiny_models[model_type])
    assert set(ckpt) == set(ref)
    for name, t in ref.items():
        info = ckpt[name]
        assert info.shape == tuple(t.shape) and to_torch(info.dtype) == t.dtype
        assert torch.equal(ckpt.load(name), t)
    assert ckpt.num_params == sum(t.numel() for t in ref.values())
    ckpt.validate()


def test_sharded_fixture_has_shards(tiny_models):
    assert len(open_checkpoint(tiny_models["llama"]).files) > 1
    assert len(open_checkpoint(tiny_models["mixtral"]).files) > 1


def test_listing_reads_no_tensor_data(tiny_llama, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(splice.checkpoint, "pread_into", boom)
    from splice.summary import summarize

    ckpt = open_checkpoint(tiny_llama)
    ckpt.validate()
    s = summarize(ckpt)
    assert s.num_layers == 4 and s.num_params == ckpt.num_params
    with pytest.raises(AssertionError, match="tensor data was read"):
        ckpt.load("model.norm.weight")


def test_huge_sparse_checkpoint_lists_instantly(tmp_path):
    """A 4 GB tensor in a sparse file: listing touches only the header."""
    n = 2**30  # float32 elements -> 4 GiB
    header = json.dumps({"big": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    header += " " * (-len(header) % 8)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode())
        f.truncate(8 + len(header) + 4 * n)
    ckpt = open_checkpoint(folder)
    assert ckpt["big"].shape == (n,) and ckpt.nbytes == 4 * n


def test_load_casts_and_is_thread_safe(tiny_llama):
    ckpt = open_checkpoint(tiny_llama)
    ref = reference_tensors(tiny_llama)
    t = ckpt.load("model.embed_tokens.weight", dtype="bfloat16")
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, ref["model.embed_tokens.weight"].to(torch.bfloat16))
    names = list(ckpt) * 4
    results: dict[int, bool] = {}

    def work(i: int, name: str) -> None:
        results[i] = torch.equal(ckpt.load(name), ref[name])

    threads = [threading.Thread(target=work, args=(i, n)) for i, n in enumerate(names)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(results) == len(names) and all(results.values())


def corrupt(folder, tmp_path, how: str):
    dst = tmp_path / how
    shutil.copytree(folder, dst)
    f = dst / "model.safetensors"
    raw = bytearray(f.read_bytes())
    if how == "truncated":
        raw = raw[:-10]
    elif how == "bad_json":
        raw[8:12] = b"!!!!"
    elif how == "huge_header":
        raw[:8] = struct.pack("<Q", 2**40)
    elif how == "tiny":
        raw = raw[:5]
    f.write_bytes(bytes(raw))
    return dst


@pytest.mark.parametrize(
    "how,message",
    [
        ("truncated", "truncated"),
        ("bad_json", "corrupt safetensors header"),
        ("huge_header", "corrupt safetensors header"),
        ("tiny", "corrupt safetensors file"),
    ],
)
def test_corrupt_files_are_clear_errors(tiny_models, tmp_path, how, message):
    folder = corrupt(tiny_models["qwen2"], tmp_path, how)
    with pytest.raises(SpliceError, match=message):
        open_checkpoint(folder)


def test_validate_catches_config_and_shape_mismatch(tiny_models, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_models["qwen2"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_hidden_layers"] = 6
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpliceError, match="config says 6 layers but the weights hold 4"):
        open_checkpoint(dst).validate()

    from safetensors.torch import load_file, save_file

    dst2 = tmp_path / "m2"
    shutil.copytree(tiny_models["qwen2"], dst2)
    sd = load_file(dst2 / "model.safetensors")
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(3, 32)
    save_file(sd, dst2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpliceError, match=r"layers\.2\.mlp\.up_proj\.weight has shape \[3, 32\]"):
        open_checkpoint(dst2).validate()


def test_missing_shard_and_missing_folder(tiny_llama, tmp_path):
    with pytest.raises(SpliceError, match="no such folder"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpliceError, match=r"no config\.json"):
        open_checkpoint(tmp_path / "empty")
    dst = tmp_path / "m"
    shutil.copytree(tiny_llama, dst)
    next(dst.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(SpliceError, match="which is missing"):
        open_checkpoint(dst)


def test_pickle_refused_unless_allowed(tmp_path):
    folder = make_tiny(tmp_path / "bin", "llama", layers=2)
    sd = reference_tensors(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(SpliceError, match=r"pickled \.bin.*--allow-pickle"):
        open_checkpoint(folder)
    ckpt = open_checkpoint(folder, allow_pickle=True)
    for name, t in sd.items():
        assert torch.equal(ckpt.load(name), t)


def test_hub_id_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SpliceError, match="hub cannot be reached"):
        open_checkpoint("splice-test/definitely-not-cached-model")
