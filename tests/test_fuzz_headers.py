"""Fuzzing the readers: whatever the bytes, only a one-line :class:`SpliceError` comes out.

Start from a valid safetensors file of a few tensors (and a valid sharded folder with its index
and config), mutate it (JSON fields replaced by values of other types, keys dropped or renamed,
offsets and shapes nudged, length fields and data sizes changed, bytes flipped, inserted and
deleted, or fully random bytes), and check that ``read_header`` / ``Checkpoint(...)`` either
accept the file or raise ``SpliceError`` with a one-line message, never anything else.

The main hypothesis test runs 10,000 mutated headers and a seeded mutation corpus another
10,000; the rest run fewer (about 30 s in all on 2 cores). Every run is derandomized, so CI
runs are repeatable. For a longer fuzz run locally, scale every test with
``SPLICE_FUZZ_EXAMPLES`` (the main test's count; the others scale with it), and set
``SPLICE_FUZZ_SEED`` to explore new examples (it seeds the corpora and turns off hypothesis'
derandomization)::

    SPLICE_FUZZ_EXAMPLES=500000 SPLICE_FUZZ_SEED=7 .venv/bin/pytest -q tests/test_fuzz_headers.py

(10x the default, 100,000, takes about 5 minutes.)
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splice.checkpoint import Checkpoint
from splice.errors import SpliceError
from splice.st_format import read_header
from splice.summary import summarize

EXAMPLES = int(os.environ.get("SPLICE_FUZZ_EXAMPLES", "10000"))
SEED = int(os.environ.get("SPLICE_FUZZ_SEED", "0"))


def fuzz_settings(n: int) -> settings:
    """Hypothesis settings for ``n`` examples: no deadline, no database, repeatable by default."""
    return settings(
        max_examples=max(1, n),
        deadline=None,
        database=None,
        derandomize="SPLICE_FUZZ_SEED" not in os.environ,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---- a valid file to start from -----------------------------------------------------------------
TENSORS = [  # name, code, shape, itemsize
    ("model.layers.0.mlp.up_proj.weight", "F32", [2, 3], 4),
    ("model.layers.1.mlp.up_proj.weight", "BF16", [2, 3], 2),
    ("model.embed_tokens.weight", "I64", [1, 2], 8),
    ("model.norm.weight", "U8", [0], 1),
]


def valid_header() -> tuple[dict, int]:
    """A header for TENSORS laid out back to back, and its data size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, code, shape, itemsize in TENSORS:
        size = itemsize * math.prod(shape)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    return header, pos


HEADER, DATA_LEN = valid_header()


def pack(raw: bytes, data_len: int = DATA_LEN, length: int | None = None) -> bytes:
    """A safetensors file: length field (``len(raw)`` unless given), header, zero data."""
    return struct.pack("<Q", len(raw) if length is None else length) + raw + bytes(data_len)


VALID = pack(json.dumps(HEADER).encode())


def check(error: SpliceError) -> None:
    """A SpliceError is fine if its message is one short line."""
    msg = str(error)
    assert msg and len(msg.splitlines()) == 1 and len(msg) < 600, msg


def read_ok(path: Path) -> None:
    try:
        read_header(path)
    except SpliceError as e:
        check(e)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One file reused by every example (writing it is the only I/O per example)."""
    return tmp_path_factory.mktemp("fuzz") / "model.safetensors"


# ---- strategies -----------------------------------------------------------------------------------
BOUNDARY_INTS = [0, 1, -1, 2, DATA_LEN, DATA_LEN - 1, DATA_LEN + 1, 2**31, 2**53 + 1, 2**63]
BOUNDARY_INTS += [2**63 - 1, 2**64, 2**64 - 1, -(2**63), 10**400]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-4, max_value=64),
    st.sampled_from(BOUNDARY_INTS),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e400, -1e400, 0.5, 4.0]),
    st.text(max_size=8),
    st.sampled_from(["F32", "BF16", "I64", "U8", "F128", "f32", "", "__metadata__", "a\nb"]),
    st.sampled_from(["llama", "mixtral", "model.layers.0.x", "model.safetensors.index.json"]),
)
json_values = st.one_of(  # flat, so that drawing one stays cheap (10,000 examples in CI)
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), scalars, max_size=3),
)
names = st.one_of(
    st.sampled_from([t[0] for t in TENSORS] + ["__metadata__", "", "x", "a\x00b", "\ud800"]),
    st.text(max_size=12),
)
FIELDS = ["dtype", "shape", "data_offsets"]
NAMES = [t[0] for t in TENSORS] + ["__metadata__", "", "x", "a\x00b", "\ud800", "a\u2028b"]
#: one JSON-level edit: (what to do, a number that picks key, field, index, delta, name, a value);
#: few draws per example, so that 10,000 examples stay cheap
edits = st.tuples(st.integers(0, 8), st.integers(0, 2**16), json_values)
#: how the edited header is written: ASCII or not, top level, padding, data size, length field
#: (right, off by one, zero, huge or any), and maybe one byte replaced (position, value)
layouts = st.tuples(
    st.booleans(),
    st.sampled_from(["object"] * 6 + ["list", "value"]),
    st.integers(0, 9),
    st.sampled_from([DATA_LEN] * 4 + [0, 3, 200]),
    st.sampled_from(["right"] * 12 + ["short", "long", "zero", "huge", "any"]),
    st.integers(0, 2**64 - 1),
    st.sampled_from([None] * 7 + ["edit"]),
    st.integers(0, 2**16),
    st.integers(0, 255),
)


def apply_edit(header: dict, edit: tuple[int, int, object]) -> dict:
    """Apply one edit (see ``edits``) to a header dict, in place; returns it."""
    op, pick, value = edit
    name = value if isinstance(value, str) else NAMES[pick % len(NAMES)]
    keys = list(header) or ["x"]
    key = keys[pick % len(keys)]
    entry = header.get(key)
    field = [*FIELDS, "extra"][pick % 4]
    if op == 0 and isinstance(entry, dict):  # a field of an entry gets a value of any type
        entry[field] = value
    elif op == 1:  # an entry or the metadata becomes any value
        header[key] = value
    elif op == 2:  # drop a field, or a whole key
        if isinstance(entry, dict) and entry and pick % 2:
            entry.pop(list(entry)[pick % len(entry)])
        else:
            header.pop(key, None)
    elif op == 3 and key in header:  # rename a tensor
        header[name] = header.pop(key)
    elif op == 4 and isinstance(entry, dict):  # nudge a shape dimension or an offset
        seq = entry.get(FIELDS[1 + pick % 2])
        if isinstance(seq, list) and seq and isinstance(seq[pick % len(seq)], int):
            seq[pick % len(seq)] += pick % 7 - 3
    elif op == 5:  # add a tensor with any fields
        header[name] = {f: value for f in FIELDS} if pick % 2 else value
    elif op == 6:  # metadata of another shape
        header["__metadata__"] = value if pick % 2 else {name: value}
    elif op == 7 and isinstance(entry, dict):  # shape or offsets become a list of anything
        entry[FIELDS[1 + pick % 2]] = value if isinstance(value, list) else [value] * (pick % 4)
    elif op == 8:  # swap two entries' offsets
        other = header.get(keys[(pick // 7) % len(keys)])
        if isinstance(entry, dict) and isinstance(other, dict):
            a, b = entry.get("data_offsets"), other.get("data_offsets")
            entry["data_offsets"], other["data_offsets"] = b, a
    return header


def serialize(header: dict, layout: tuple, other: object) -> bytes:
    """The whole file for an edited header, laid out as ``layout`` says (see ``layouts``)."""
    ascii_only, top, pad, data_len, length, any_length, edit, pos, byte = layout
    doc = header if top == "object" else [header] if top == "list" else other
    try:
        raw = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    except ValueError:  # e.g. an integer too long to print
        raw = b"{}"
    raw += b" " * pad
    if edit:
        pos %= len(raw)
        raw = raw[:pos] + bytes([byte]) + raw[pos + 1 :]
    n = {"right": len(raw), "short": len(raw) - 1, "long": len(raw) + 1, "zero": 0}
    n.update(huge=2**64 - 1, any=any_length)
    return pack(raw, data_len, n[length])


@fuzz_settings(EXAMPLES)
@given(ops=st.lists(edits, min_size=1, max_size=3), layout=layouts)
def test_mutated_headers_raise_only_splice_errors(scratch, ops, layout):
    header = json.loads(json.dumps(HEADER))
    for op in ops:
        apply_edit(header, op)
    scratch.write_bytes(serialize(header, layout, ops[0][2]))
    read_ok(scratch)


@fuzz_settings(EXAMPLES // 10)
@given(blob=st.binary(max_size=300))
def test_random_bytes_raise_only_splice_errors(scratch, blob):
    scratch.write_bytes(blob)
    read_ok(scratch)


@fuzz_settings(EXAMPLES // 10)
@given(raw=st.binary(max_size=200), data_len=st.integers(0, 64))
def test_random_header_bytes_raise_only_splice_errors(scratch, raw, data_len):
    scratch.write_bytes(pack(raw, data_len))
    read_ok(scratch)


def test_mutation_corpus_of_valid_file(scratch):
    """Seeded byte-level mutations of a valid file: flips, inserts, deletes, overwritten words."""
    rng = random.Random(SEED)
    accepted = 0
    for _ in range(EXAMPLES):
        b = bytearray(VALID)
        for _ in range(rng.randint(1, 4)):
            k, p = rng.random(), rng.randrange(len(b) + 1)
            if k < 0.4:
                b[min(p, len(b) - 1)] = rng.randrange(256)
            elif k < 0.6:
                del b[p : p + rng.randint(1, 16)]
            elif k < 0.8:
                b[p:p] = rng.choice(
                    [b"[", b"]", b"{", b"}", b'"', b",", b":", b"-", b"1e9", b"\xff"]
                )
            else:
                b[p : p + 8] = rng.randrange(2**64).to_bytes(8, "little")
        scratch.write_bytes(bytes(b))
        try:
            read_header(scratch)
            accepted += 1
        except SpliceError as e:
            check(e)
    assert accepted < EXAMPLES  # the corpus does reach the error paths


# ---- whole folders: index and config ------------------------------------------------------------
CONFIG = {"model_type": "mystery", "num_hidden_layers": 2, "hidden_size": 2, "vocab_size": 1}
WEIGHT_MAP = {
    t[0]: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, t in enumerate(TENSORS)
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A valid two-shard folder (config, index, shards) of an unknown, inferred architecture."""
    root = tmp_path_factory.mktemp("fuzz_folder")
    weight_map = {}
    for i, part in enumerate((TENSORS[:2], TENSORS[2:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        header, pos = {}, 0
        for name, code, shape, itemsize in part:
            size = itemsize * math.prod(shape)
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [pos, pos + size]}
            weight_map[name] = file
            pos += size
        (root / file).write_bytes(pack(json.dumps(header).encode(), pos))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(CONFIG))
    with warnings.catch_warnings():  # the starting point is valid
        warnings.simplefilter("ignore")
        ckpt = Checkpoint(root)
        ckpt.validate()
        assert summarize(ckpt).num_layers == 2
    return root


def open_ok(folder: Path) -> None:
    """Open, validate and summarize: only one-line SpliceErrors may come out."""
    try:
        with warnings.catch_warnings():  # "no spec for model_type ...": expected here
            warnings.simplefilter("ignore")
            ckpt = Checkpoint(folder)
            ckpt.validate()
            summarize(ckpt)
    except SpliceError as e:
        check(e)


shard_names = st.one_of(
    st.sampled_from(sorted(set(WEIGHT_MAP.values()))),
    st.sampled_from(["../x.safetensors", "/etc/passwd", ".", "..", "", "a/b", "config.json"]),
    st.sampled_from(["model.safetensors.index.json", "x\x00y", "\ud800", "sub\\x.safetensors"]),
    json_values,
)


@st.composite
def mutated_index(draw) -> bytes:
    """The valid index with a few edits to its weight_map, or to its shape, as bytes."""
    weight_map: object = dict(WEIGHT_MAP)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(weight_map, dict):
            break
        op = draw(st.integers(0, 3))
        key = draw(st.sampled_from(list(weight_map))) if weight_map else "x"
        if op == 0:  # a tensor's shard becomes any name or value
            weight_map[key] = draw(shard_names)
        elif op == 1:  # a tensor is dropped from the map
            weight_map.pop(key, None)
        elif op == 2:  # a tensor is renamed
            weight_map[draw(names)] = weight_map.pop(key, "x")
        else:  # the map becomes any value
            weight_map = draw(json_values)
    top = draw(st.sampled_from(["index"] * 3 + ["no_map", "list", "value"]))
    doc = {
        "index": {"metadata": {"total_size": 64}, "weight_map": weight_map},
        "no_map": {"metadata": weight_map},
        "list": [weight_map],
        "value": weight_map,
    }[top]
    try:
        raw = json.dumps(doc).encode("utf-8", "surrogatepass")
    except ValueError:  # e.g. an integer too long to print
        raw = b"{}"
    if draw(st.sampled_from([False, False, False, True])):  # a few bytes replaced
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(max_size=3)) + raw[i + draw(st.integers(0, 2)) :]
    return raw


@fuzz_settings(EXAMPLES // 10)
@given(raw=mutated_index())
def test_mutated_indexes_raise_only_splice_errors(folder, raw):
    index = folder / "model.safetensors.index.json"
    index.write_bytes(raw)
    try:
        open_ok(folder)
    finally:
        index.write_text(json.dumps({"weight_map": WEIGHT_MAP}))


@fuzz_settings(EXAMPLES // 20)
@given(
    changes=st.dictionaries(
        st.sampled_from(
            [
                "model_type",
                "num_hidden_layers",
                "hidden_size",
                "vocab_size",
                "architectures",
                "tie_word_embeddings",
                "max_position_embeddings",
                "layer_types",
            ]
        ),
        json_values,
        max_size=3,
    ),
    top=st.sampled_from(["object", "object", "object", "list", "value", "bytes"]),
    extra=json_values,
)
def test_mutated_configs_raise_only_splice_errors(folder, changes, top, extra):
    config = folder / "config.json"
    doc = {**CONFIG, **changes}
    try:
        if top == "bytes":
            config.write_bytes(json.dumps(doc).encode()[:-1] + b"\xff")
        else:
            config.write_text(
                json.dumps(doc if top == "object" else [doc] if top == "list" else extra)
            )
        open_ok(folder)
    finally:
        config.write_text(json.dumps(CONFIG))


# ---- pickles ------------------------------------------------------------------------------------
def test_mutated_pickles_raise_only_splice_errors(tmp_path):
    """Seeded byte mutations of zip and legacy ``.bin`` files, read with --allow-pickle."""
    import torch

    torch.manual_seed(0)
    sd = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(3),
        "model.layers.1.mlp.up_proj.weight": torch.randn(2, 2).to(torch.bfloat16),
        "model.embed_tokens.weight": torch.arange(6).reshape(2, 3),
    }
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mystery"}')
    file = folder / "pytorch_model.bin"
    rng = random.Random(SEED)
    for legacy in (False, True):
        torch.save({"state_dict": sd}, file, _use_new_zipfile_serialization=not legacy)
        base = file.read_bytes()
        for _ in range(max(1, EXAMPLES // 50)):
            b = bytearray(base)
            for _ in range(rng.randint(1, 4)):
                k, p = rng.random(), rng.randrange(len(b))
                if k < 0.5:
                    b[p] = rng.randrange(256)
                elif k < 0.75:
                    del b[p : p + rng.randint(1, 40)]
                else:
                    b[p : p + 8] = rng.randrange(2**64).to_bytes(8, "little")
            file.write_bytes(bytes(b))
            try:
                ckpt = Checkpoint(folder, allow_pickle=True)
                for name in ckpt:
                    ckpt.load(name)
            except SpliceError as e:
                check(e)
