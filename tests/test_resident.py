"""The evolve path: resident sources (no disk reads after the first candidate), prepared plans,
``empty_model`` and the checks ``execute_into`` makes before it touches a module."""

from __future__ import annotations

import builtins
import contextlib
import os

import pytest
import torch
from conftest import logits

from splice import checkpoint as checkpoint_mod
from splice.errors import SpliceError
from splice.merge import MergeOptions, merge_into, plan, run
from splice.resident import ResidentCheckpoint, empty_model


def ties_recipe(zoo) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / "math"), "parameters": {"weight": 1.0, "density": 0.7}},
            {"model": str(zoo / "lang"), "parameters": {"weight": 1.0, "density": 0.7}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }


@contextlib.contextmanager
def counting_reads():
    """Bytes read from tensor files (``pread``) and files opened, by anyone, while inside."""
    seen = {"tensor_bytes": 0, "opened": []}
    real_pread, real_open, real_os_open = checkpoint_mod.pread_into, builtins.open, os.open

    def pread(fd, buf, offset):
        seen["tensor_bytes"] += len(buf)
        return real_pread(fd, buf, offset)

    def opener(file, *args, **kwargs):
        seen["opened"].append(str(file))
        return real_open(file, *args, **kwargs)

    def os_opener(path, *args, **kwargs):
        seen["opened"].append(str(path))
        return real_os_open(path, *args, **kwargs)

    checkpoint_mod.pread_into, builtins.open, os.open = pread, opener, os_opener
    try:
        yield seen
    finally:
        checkpoint_mod.pread_into, builtins.open, os.open = real_pread, real_open, real_os_open


def test_second_and_later_merges_read_nothing_from_disk(zoo, tmp_path):
    recipe = ties_recipe(zoo)
    resident = {str(zoo / n): ResidentCheckpoint(zoo / n) for n in ("base", "math", "lang")}
    opts = MergeOptions(show_progress=False, workers=1)
    p = plan(recipe, opts, resident)
    model = empty_model(p.config)
    with counting_reads() as first:
        merge_into(model, p, options=opts)
    assert first["tensor_bytes"] > 0
    for _ in range(2):
        with counting_reads() as later:
            merge_into(model, p, options=opts)
        assert later == {"tensor_bytes": 0, "opened": []}, later
    # a re-planned candidate (new weights) on the same resident sources reads no tensor either
    recipe["models"][1]["parameters"]["weight"] = 0.5
    with counting_reads() as replanned:
        merge_into(model, recipe, resident, options=opts)
    assert replanned["tensor_bytes"] == 0
    # and what sits in the module is exactly the written merge
    out = run(recipe, tmp_path / "out", MergeOptions(show_progress=False))
    torch.testing.assert_close(logits(model), logits(out), rtol=0, atol=0)


def test_resident_load_is_fresh_memory_and_cast_on_request(tiny_llama):
    ckpt = ResidentCheckpoint(tiny_llama)
    name = next(iter(ckpt))
    a = ckpt.load(name)
    a.add_(1)  # a method working in place must not corrupt the resident copy
    b = ckpt.load(name, dtype="bfloat16")
    assert b.dtype == torch.bfloat16
    assert torch.equal(ckpt.load(name), checkpoint_mod.Checkpoint(tiny_llama).load(name))
    assert ckpt.bytes_read == ckpt[name].nbytes  # read once, however often loaded
    ckpt.warm()
    assert ckpt.resident_bytes == ckpt.nbytes


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma", "phi3"])
def test_empty_model_filled_from_a_checkpoint_gives_its_logits(tiny_models, model_type):
    """Weights uninitialised, buffers (rotary inv_freq) real: filled, it is the model."""
    from transformers import AutoModelForCausalLM

    src = tiny_models[model_type]
    ckpt = checkpoint_mod.Checkpoint(src)
    model = empty_model(ckpt.config, dtype="float32")
    state = model.state_dict()
    with torch.no_grad():
        for name in ckpt:
            state[name].copy_(ckpt.load(name))
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    torch.testing.assert_close(logits(model), logits(ref), rtol=0, atol=0)


def test_empty_model_refuses_custom_code_and_bad_devices(tiny_llama):
    config = dict(checkpoint_mod.Checkpoint(tiny_llama).config)
    with pytest.raises(SpliceError, match="auto_map"):
        empty_model({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}})
    with pytest.raises(SpliceError, match="banana"):
        empty_model(config, device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(SpliceError, match="CUDA"):
            empty_model(config, device="cuda")


def test_execute_into_checks_the_module_before_touching_it(trio):
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(trio["ft1"]), "parameters": {"weight": 0.5}},
            {"model": str(trio["ft2"]), "parameters": {"weight": 0.5}},
        ],
    }
    p = plan(recipe)
    wrong = dict(p.config, intermediate_size=p.config["intermediate_size"] * 2)
    model = empty_model(wrong)
    with torch.no_grad():
        for v in model.state_dict().values():
            v.fill_(0.25)  # uninitialised memory may hold NaN, which equals nothing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SpliceError, match="the module's parameter is"):
        merge_into(model, p, options=MergeOptions(show_progress=False))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-merged
    fewer = empty_model(dict(p.config, num_hidden_layers=1))
    with pytest.raises(SpliceError, match="no parameter in the module"):
        merge_into(fewer, p, options=MergeOptions(show_progress=False))
