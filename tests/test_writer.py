"""Streaming writer and convert: bit-identical round trips, HF-loadable output, atomicity."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ARCHS
from test_checkpoint import reference_tensors

from splice import SpliceError, open_checkpoint, st_format
from splice.convert import convert
from splice.st_format import preallocate
from splice.writer import CheckpointWriter, TensorSpec, plan_shards


def test_plan_shards_respects_cap_and_alignment():
    specs = [
        TensorSpec("a", (10,), "bfloat16"),  # 20 B
        TensorSpec("b", (10,), "float32"),  # 40 B
        TensorSpec("c", (30,), "float32"),  # 120 B: alone over the cap
        TensorSpec("d", (5,), "float32"),
    ]
    shards = plan_shards(specs, 64)
    assert [[s.name for s in sh] for sh in shards] == [["b", "a"], ["c"], ["d"]]


def test_plan_shards_balances_sizes_under_the_cap():
    specs = [TensorSpec(f"t{i}", (25,), "float32") for i in range(6)]  # 100 B each
    shards = plan_shards(specs, 400)  # greedy would give 400 B + 200 B
    assert [[s.name for s in sh] for sh in shards] == [["t0", "t1", "t2"], ["t3", "t4", "t5"]]
    assert plan_shards([], 400) == [[]]
    assert plan_shards([TensorSpec("e", (0,), "float32")], 400) == [
        [TensorSpec("e", (0,), "float32")]
    ]


def greedy_shard_count(sizes: list[int], cap: int) -> int:
    count, size = 1, 0
    for i, n in enumerate(sizes):
        if i and size + n > cap:
            count, size = count + 1, 0
        size += n
    return count


def test_plan_shards_properties_on_random_sizes():
    """Every tensor once and in order; no shard of several tensors over the cap; never more
    shards than the greedy split (the fewest in order)."""
    rng = random.Random(0)
    for _ in range(500):
        sizes = [
            rng.choice([0, 1, rng.randint(1, 50), rng.randint(1, 400)])
            for _ in range(rng.randint(1, 30))
        ]
        cap = rng.randint(1, 300)
        specs = [TensorSpec(f"t{i}", (n,), "uint8") for i, n in enumerate(sizes)]
        shards = plan_shards(specs, cap)
        assert [s for sh in shards for s in sh] == specs
        assert all(len(sh) == 1 or sum(s.nbytes for s in sh) <= cap for sh in shards)
        assert len(shards) <= greedy_shard_count(sizes, cap)


def test_interleaved_takes_each_shard_in_turn(tmp_path):
    specs = [TensorSpec(f"t{i}", (25,), "float32") for i in range(7)]  # 100 B each
    w = CheckpointWriter(tmp_path / "o", specs, max_shard_size=300)  # t0-1 | t2-4 | t5-6
    try:
        assert [w.slots[s.name].shard for s in specs] == [0, 0, 1, 1, 1, 2, 2]
        order = [s.name for s in w.interleaved(specs)]
        assert order == ["t0", "t2", "t5", "t1", "t3", "t6", "t4"]
    finally:
        w.abort()


def test_preallocate_reserves_blocks_or_goes_sparse(tmp_path, monkeypatch):
    size = 3 * 2**20 + 5
    for refused in (False, True):
        if refused:
            monkeypatch.setattr(st_format, "_fallocate", lambda fd, n: errno.EOPNOTSUPP)
        path = tmp_path / f"f{refused}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"head", 0)
            preallocate(fd, size)
            st = os.fstat(fd)
            assert st.st_size == size and os.pread(fd, 6, 0) == b"head\0\0"
            assert os.pread(fd, 8, size - 8) == bytes(8)
            if refused:
                assert st.st_blocks * 512 < 2**20  # sparse
        finally:
            os.close(fd)


def test_no_room_at_preallocation_is_one_line_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setattr(st_format, "_fallocate", lambda fd, n: errno.ENOSPC)
    with pytest.raises(SpliceError, match=r"no space left on .*nothing written"):
        CheckpointWriter(tmp_path / "o", [TensorSpec("a", (4,), "float32")])
    assert list(tmp_path.iterdir()) == []


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(7, 5, generator=g),
        "bf16": torch.randn(3, 11, generator=g).to(torch.bfloat16),
        "f16": torch.randn(13, generator=g).to(torch.float16),
        "i64": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
    }


@pytest.mark.parametrize("cap", ["1GB", "64B"])
def test_write_round_trip_is_bit_identical(tmp_path, cap):
    tensors = mixed_tensors()
    specs = [TensorSpec(n, tuple(t.shape), str(t.dtype)) for n, t in tensors.items()]
    out = tmp_path / "out"
    with CheckpointWriter(out, specs, max_shard_size=cap) as w:
        for name in reversed(list(tensors)):  # any order
            w.write(name, tensors[name])
        w.write_config({"model_type": "llama"})
    back = reference_tensors(out)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if cap == "1GB":
        assert (
            files == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
        )
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert set(index["weight_map"].values()) == set(files) and len(files) > 1
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in tensors.values()
        )


def test_write_casts_to_planned_dtype_and_checks_shape(tmp_path):
    with CheckpointWriter(tmp_path / "o", [TensorSpec("x", (2, 2), "bfloat16")]) as w:
        with pytest.raises(ValueError, match="shape"):
            w.write("x", torch.ones(4))
        w._written.discard("x")
        w.write("x", torch.full((2, 2), 1.5))
        with pytest.raises(ValueError, match="written twice"):
            w.write("x", torch.ones(2, 2))
        with pytest.raises(ValueError, match="not planned"):
            w.write("y", torch.ones(1))
        w.write_config({})
    t = reference_tensors(tmp_path / "o")["x"]
    assert t.dtype == torch.bfloat16 and torch.equal(
        t, torch.full((2, 2), 1.5, dtype=torch.bfloat16)
    )


def test_same_tensor_under_two_names_is_two_copies(tmp_path):
    t = torch.randn(4, 4)
    specs = [TensorSpec("a", (4, 4), "float32"), TensorSpec("b", (4, 4), "float32")]
    with CheckpointWriter(tmp_path / "o", specs) as w:
        w.write("a", t)
        w.write("b", t)
        w.write_config({})
    ckpt = open_checkpoint(tmp_path / "o")
    a, b = ckpt.load("a"), ckpt.load("b")
    assert ckpt["a"].offset != ckpt["b"].offset
    a.zero_()
    assert torch.equal(b, t)


def test_incomplete_or_failing_write_leaves_nothing(tmp_path):
    specs = [TensorSpec("a", (2,), "float32"), TensorSpec("b", (2,), "float32")]
    with (
        pytest.raises(RuntimeError, match="never written"),
        CheckpointWriter(tmp_path / "o", specs) as w,
    ):
        w.write("a", torch.ones(2))
        w.write_config({})
    with pytest.raises(KeyError), CheckpointWriter(tmp_path / "o", specs) as w:
        w.write("a", torch.ones(2))
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_complete_looking_folder(tmp_path):
    """SIGKILL midway: no folder at the target; the hidden temp folder has no config/index."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from splice.writer import CheckpointWriter, TensorSpec
        specs = [TensorSpec(f"t{{i}}", (1000,), "float32") for i in range(10)]
        w = CheckpointWriter({str(tmp_path / "out")!r}, specs, max_shard_size="8KB")
        for i in range(5):
            w.write(f"t{{i}}", torch.ones(1000))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert not (tmp_path / "out").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != ".out.splice-lock"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".out.splice-tmp-")
    names = {p.name for p in leftovers[0].iterdir()}
    assert "config.json" not in names and "model.safetensors.index.json" not in names
    with pytest.raises(SpliceError):
        open_checkpoint(leftovers[0])


def test_existing_target_needs_overwrite(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "config.json").write_text("{}")
    (tmp_path / "o" / "model-00001-of-00002.safetensors").write_text("old shard")
    with pytest.raises(SpliceError, match="--overwrite"):
        CheckpointWriter(tmp_path / "o", [])
    with CheckpointWriter(tmp_path / "o", [TensorSpec("a", (1,), "float32")], overwrite=True) as w:
        w.write("a", torch.ones(1))
        w.write_config({})
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def logits(folder, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.arange(3, 40).reshape(1, -1) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("model_type", ARCHS)
def test_convert_reshard_is_bit_identical_and_loads(tiny_models, tmp_path, model_type):
    src = tiny_models[model_type]
    out = convert(src, tmp_path / "out", max_shard_size="16KB")
    ref, got = reference_tensors(src), reference_tensors(out)
    assert set(ref) == set(got)
    assert all(torch.equal(ref[n], got[n]) and ref[n].dtype == got[n].dtype for n in ref)
    assert len(list(out.glob("*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert "splice" in (out / "README.md").read_text()
    assert torch.equal(logits(src), logits(out))


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "gemma"])
def test_convert_to_bfloat16(tiny_models, tmp_path, model_type):
    src = tiny_models[model_type]
    out = convert(src, tmp_path / "bf16", dtype="bf16")
    ref, got = reference_tensors(src), reference_tensors(out)
    for n in ref:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], ref[n].to(torch.bfloat16))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert torch.equal(logits(src, torch.bfloat16), logits(out, torch.bfloat16))


def test_output_folder_has_mkdir_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        with CheckpointWriter(tmp_path / "out", [TensorSpec("w", (2,), "float32")]) as w:
            w.write("w", torch.zeros(2))
            w.write_config({"model_type": "llama"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750  # not mkdtemp's 0o700
