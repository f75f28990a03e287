"""Bad input through the real CLI: one ``splice: error:`` line and exit code 2, never a traceback.

One test per fault class of the readers: safetensors headers, the shard index, ``config.json``,
pickled ``.bin`` weights, empty or invalid model references, and unknown architectures; and
``convert`` of a corrupt model leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splice import open_checkpoint
from splice.cli import main


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI; check it failed with exactly one error line and no traceback; return it."""
    rc = main(list(argv))
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("splice: error: "), err
    return lines[0]


def split_file(file: Path) -> tuple[dict, bytes]:
    """A safetensors file as (header JSON, data bytes)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(file: Path, header: bytes, data: bytes) -> None:
    file.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.fixture
def single(tiny_models, tmp_path) -> Path:
    """A copy of the one-file tiny qwen2 model, free to corrupt."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], dst)
    return dst


@pytest.fixture
def sharded(tiny_llama, tmp_path) -> Path:
    """A copy of the sharded tiny llama model (with its index), free to corrupt."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama, dst)
    return dst


# ---- 1. safetensors headers ---------------------------------------------------------------------
FIRST = "model.embed_tokens.weight"


def _set(field: str, value: object):
    def edit(h: dict) -> None:
        h[FIRST][field] = value

    return edit


HEADER_EDITS = {
    "dtype_list": (_set("dtype", ["F32"]), "dtype is a list"),
    "dtype_unknown": (_set("dtype", "F128"), "unsupported dtype 'F128'"),
    "metadata_list": (lambda h: h.update({"__metadata__": ["pt"]}), "__metadata__ is a list"),
    "metadata_value": (
        lambda h: h.update({"__metadata__": {"format": 1}}),
        "__metadata__['format'] is an integer",
    ),
    "offset_float": (
        lambda h: h[FIRST]["data_offsets"].__setitem__(1, 1.0 * h[FIRST]["data_offsets"][1]),
        "data_offsets",
    ),
    "offset_bool": (lambda h: h[FIRST]["data_offsets"].__setitem__(0, False), "data_offsets"),
    "offset_string": (lambda h: h[FIRST]["data_offsets"].__setitem__(0, "0"), "data_offsets"),
    "offset_short": (_set("data_offsets", [0]), "data_offsets"),
    "shape_float": (lambda h: h[FIRST]["shape"].__setitem__(0, 96.0), "shape has a number"),
    "shape_bool": (_set("shape", [True, 32]), "shape has a boolean"),
    "shape_negative": (_set("shape", [-96, -32]), "shape has dimension -96"),
    "shape_huge": (_set("shape", [2**64, 0]), "shape has dimension"),
    "shape_overflow": (_set("shape", [2**62] * 40), "needs more than"),
    "shape_not_list": (_set("shape", "96x32"), "shape is a string"),
    "entry_not_object": (lambda h: h.update({FIRST: [1, 2]}), "is a list, not an object"),
    "entry_missing_field": (lambda h: h[FIRST].pop("dtype"), "has no 'dtype'"),
    "name_newline": (lambda h: h.update({"a\nb": h.pop(FIRST)}), "invalid tensor name 'a\\nb'"),
    "name_empty": (lambda h: h.update({"": h.pop(FIRST)}), "invalid tensor name ''"),
    "not_an_object": (lambda h: None, "a list, not an object"),
}


@pytest.mark.parametrize("how", [*HEADER_EDITS, "offset_1e400", "not_utf8", "nested"])
def test_malformed_safetensors_header_is_one_line(single, capsys, how):
    file = single / "model.safetensors"
    header, data = split_file(file)
    if how == "offset_1e400":  # a JSON float too big for int(): was an OverflowError
        header[FIRST]["data_offsets"] = [0, "BIG"]
        write_raw(file, json.dumps(header).replace('"BIG"', "1e400").encode(), data)
        expected = "data_offsets is [0, inf]"
    elif how == "not_utf8":
        write_raw(file, json.dumps(header).encode().replace(b"model.norm", b"model.\xffnorm"), data)
        expected = "not UTF-8"
    elif how == "nested":
        write_raw(file, b"[" * 50_000 + b"]" * 50_000, data)
        expected = "nested too deeply"
    elif how == "not_an_object":
        write_raw(file, b"[1, 2]", data)
        expected = HEADER_EDITS[how][1]
    else:
        edit, expected = HEADER_EDITS[how]
        edit(header)
        write_raw(file, json.dumps(header).encode(), data)
    line = cli_error(capsys, "inspect", str(single))
    assert str(file) in line and expected in line, line


@pytest.mark.parametrize("length", [2**64 - 1, 2**40, 100 * 2**20 + 1])
def test_huge_header_length_is_one_line(single, capsys, length):
    file = single / "model.safetensors"
    raw = bytearray(file.read_bytes())
    raw[:8] = struct.pack("<Q", length)
    file.write_bytes(bytes(raw))
    assert "corrupt safetensors header (claims" in cli_error(capsys, "inspect", str(single))


# ---- 2. the shard index -------------------------------------------------------------------------
INDEX = "model.safetensors.index.json"


def _first_shard(index: dict) -> str:
    return next(iter(index["weight_map"].values()))


INDEX_EDITS = {
    "weight_map_list": (
        lambda d: d.update(weight_map=list(d["weight_map"])),
        "weight_map is a list",
    ),
    "weight_map_missing": (lambda d: d.pop("weight_map"), "no weight_map"),
    "value_not_string": (
        lambda d: d["weight_map"].update({FIRST: 3}),
        "is an integer, not a file name",
    ),
    "parent_path": (
        lambda d: d["weight_map"].update({FIRST: "../" + _first_shard(d)}),
        "a shard must be a plain file name",
    ),
    "absolute_path": (
        lambda d: d["weight_map"].update({FIRST: "/etc/passwd"}),
        "a shard must be a plain file name",
    ),
    "subfolder": (
        lambda d: d["weight_map"].update({FIRST: "sub/x.safetensors"}),
        "a shard must be a plain file name",
    ),
    "missing_shard": (
        lambda d: d["weight_map"].update({FIRST: "nope.safetensors"}),
        "which is missing",
    ),
}


@pytest.mark.parametrize("how", [*INDEX_EDITS, "not_object", "not_json", "not_utf8"])
def test_malformed_index_is_one_line(sharded, capsys, how):
    index = sharded / INDEX
    data = json.loads(index.read_text())
    if how == "not_object":
        index.write_text(json.dumps([data]))
        expected = "a list, not a JSON object"
    elif how == "not_json":
        index.write_text('{"weight_map": {')
        expected = "not valid JSON"
    elif how == "not_utf8":
        index.write_bytes(b'{"weight_map": {"\xff": "x"}}')
        expected = "not UTF-8"
    else:
        edit, expected = INDEX_EDITS[how]
        edit(data)
        index.write_text(json.dumps(data))
    line = cli_error(capsys, "inspect", str(sharded))
    assert str(index) in line and expected in line, line


# ---- 3. config.json -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("[1, 2]", "not a JSON object (a list)"),
        ('"llama"', "not a JSON object (a string)"),
        ("42", "not a JSON object (an integer)"),
        ("{", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        ('{"model_type": ["llama"]}', "model_type is a list, not a string"),
        ('{"model_type": 7}', "model_type is an integer, not a string"),
        ('{"model_type": "qwen2", "num_hidden_layers": "4"}', "num_hidden_layers is '4'"),
        ('{"model_type": "qwen2", "num_hidden_layers": 4.0}', "num_hidden_layers is 4.0"),
        ('{"model_type": "qwen2", "vocab_size": true}', "vocab_size is True"),
        ('{"model_type": "qwen2", "hidden_size": -32}', "hidden_size is -32"),
        ('{"model_type": "qwen2", "architectures": "Qwen2ForCausalLM"}', "architectures is"),
        ('{"model_type": "qwen2", "tie_word_embeddings": "no"}', "tie_word_embeddings is"),
    ],
)
def test_malformed_config_is_one_line(single, capsys, text, expected):
    config = single / "config.json"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    line = cli_error(capsys, "inspect", str(single))
    assert str(config) in line and expected in line, line


# ---- 4. pickled weights -------------------------------------------------------------------------
class Evil:
    """Unpickling this runs a shell command (it would create ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def pickled(single) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tiny model with its weights removed, and its tensors (to pickle as a test likes)."""
    sd = load_file(single / "model.safetensors")
    (single / "model.safetensors").unlink()
    return single, sd


def test_pickle_wrapped_state_dict_is_unwrapped(pickled, capsys):
    folder, sd = pickled
    for key in ("state_dict", "model"):
        torch.save({key: sd, "epoch": 3}, folder / "pytorch_model.bin")
        assert main(["inspect", str(folder), "--allow-pickle"]) == 0
        ckpt = open_checkpoint(folder, allow_pickle=True)
        assert set(ckpt) == set(sd)
        assert all(torch.equal(ckpt.load(n), t) for n, t in sd.items())
    assert "Traceback" not in capsys.readouterr().err


def test_pickle_legacy_format_loads(pickled):
    folder, sd = pickled
    torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ckpt = open_checkpoint(folder, allow_pickle=True)
    assert all(torch.equal(ckpt.load(n), t) for n, t in sd.items())
    ckpt.validate()


@pytest.mark.parametrize(
    "how,expected",
    [
        ("list", "holds a list, not a dict of tensors"),
        ("non_tensor", "'lr' is a float, not a tensor"),
        ("int_key", "has key 7, not a tensor name"),
        ("complex", "unsupported dtype complex64"),
        ("garbage", "refused: not a PyTorch weights file"),
        ("truncated", "not a readable PyTorch weights file"),
        ("empty", "not a readable PyTorch weights file"),
    ],
)
def test_bad_pickle_is_one_line(pickled, capsys, how, expected):
    folder, sd = pickled
    file = folder / "pytorch_model.bin"
    if how == "list":
        torch.save(list(sd.values()), file)
    elif how == "non_tensor":
        torch.save({**sd, "lr": 0.1}, file)
    elif how == "int_key":
        torch.save({7: torch.ones(2)}, file)
    elif how == "complex":
        torch.save({"x": torch.ones(2, dtype=torch.complex64)}, file)
    elif how == "garbage":
        file.write_bytes(bytes(range(256)) * 8)
    elif how == "truncated":
        torch.save(sd, file)
        file.write_bytes(file.read_bytes()[:-100])
    else:
        file.write_bytes(b"")
    line = cli_error(capsys, "inspect", str(folder), "--allow-pickle")
    assert str(file) in line and expected in line, line


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_in_one_line(pickled, capsys, tmp_path, legacy):
    folder, _ = pickled
    marker = tmp_path / "pwned"
    torch.save(
        {"x": Evil(marker)},
        folder / "pytorch_model.bin",
        _use_new_zipfile_serialization=not legacy,
    )
    line = cli_error(capsys, "inspect", str(folder), "--allow-pickle")
    assert "refused: the pickle asks to run code (GLOBAL posix.system)" in line, line
    assert "convert it to safetensors from a trusted environment" in line
    assert "weights_only` set to `False`" not in line
    assert not marker.exists()


# ---- 5. model references ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref,expected",
    [
        ("", "empty model reference: give a model folder or hub id"),
        ("  ", "empty model reference"),
        ("bad--name/model", "not a valid hub id"),
        ("../nowhere", "not a valid hub id"),
    ],
)
def test_bad_model_reference_is_one_line(capsys, tmp_path, monkeypatch, ref, expected):
    monkeypatch.chdir(tmp_path)  # "" must not mean "the current folder"
    assert expected in cli_error(capsys, "inspect", ref)


# ---- 6. unknown architectures -------------------------------------------------------------------
def test_unknown_architecture_is_inferred_with_a_warning(single, capsys):
    config = json.loads((single / "config.json").read_text())
    (single / "config.json").write_text(json.dumps({**config, "model_type": "mystery"}))
    assert main(["inspect", str(single)]) == 0
    captured = capsys.readouterr()
    assert "splice: warning: no spec for model_type 'mystery'" in captured.err
    assert "layout inferred from tensor names" in captured.out


def test_unknown_architecture_without_layers_is_one_line(single, capsys):
    (single / "config.json").write_text('{"model_type": "mystery"}')
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    write_raw(single / "model.safetensors", json.dumps(header).encode(), bytes(8))
    line = cli_error(capsys, "inspect", str(single))
    assert "unknown architecture 'mystery'" in line and "no per-layer tensor names" in line


# ---- convert writes nothing from a corrupt input ------------------------------------------------
@pytest.mark.parametrize("what", ["header", "index", "config"])
def test_convert_of_corrupt_input_writes_nothing(sharded, capsys, tmp_path, what):
    if what == "header":
        shard = next(sharded.glob("model-00002-*.safetensors"))
        header, data = split_file(shard)
        next(iter(header.values()))["shape"] = [1.5]
        write_raw(shard, json.dumps(header).encode(), data)
    elif what == "index":
        (sharded / INDEX).write_text('{"weight_map": {"x": "../x.safetensors"}}')
    else:
        (sharded / "config.json").write_text("[]")
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    cli_error(capsys, "convert", str(sharded), str(out_parent / "out"), "--no-progress")
    assert list(out_parent.iterdir()) == []
