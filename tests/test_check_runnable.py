"""``splice.modeling.check_runnable``: the one check of a model before it is run (eval, zoo eval,
analyze, calibration, heal, slice) — read, own code only with trust_remote_code, tensors whole."""

import json
import shutil

import pytest

from splice.checkpoint import open_checkpoint
from splice.errors import SpliceError
from splice.modeling import check_runnable
from splice.zoo.evaluate import check_model


def _custom(src, dst):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="xllama", auto_map={"AutoModelForCausalLM": "m.XForCausalLM"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_clean_folder_or_checkpoint_passes(tiny_llama):
    ckpt = check_runnable(tiny_llama)
    assert ckpt.path == open_checkpoint(tiny_llama).path
    opened = open_checkpoint(tiny_llama)
    assert check_runnable(opened) is opened


def test_own_code_needs_trust_remote_code(tiny_llama, tmp_path):
    custom = _custom(tiny_llama, tmp_path / "custom")
    with pytest.raises(SpliceError, match=r"auto_map.*--trust-remote-code"):
        check_runnable(custom)
    with pytest.raises(SpliceError, match=r"auto_map.*--trust-remote-code"):
        check_runnable(open_checkpoint(custom))  # an open checkpoint is checked too
    assert check_runnable(custom, trust_remote_code=True).path == custom.resolve()


def test_local_only_refuses_what_is_not_a_folder(tmp_path):
    with pytest.raises(SpliceError, match=r"not a model folder \(no such folder\)"):
        check_runnable(tmp_path / "nope", local_only=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpliceError, match=r"not a model folder \(not a folder\)"):
        check_model(tmp_path / "file")  # the zoo's check is check_runnable, local only


def test_slice_checks_the_model_before_its_calibration(tiny_llama, tmp_path):
    from splice.surgery.slicing import plan_slice

    custom = _custom(tiny_llama, tmp_path / "custom")
    with pytest.raises(SpliceError, match="auto_map"):  # not the missing calibration file
        plan_slice(custom, sparsity=0.25, calibration=tmp_path / "missing.txt")
