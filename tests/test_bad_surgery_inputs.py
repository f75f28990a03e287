"""Bad options to the surgery verbs, ``splice eval``, ``analyze activations`` and ``zoo build``
(issue 22): one line on stderr, exit 2, no traceback, no model loaded and nothing at OUT.

Every case drives the real CLI (``splice.cli.main``). A model load or a zoo training run during
a case is a test failure (they are patched to raise), so each refusal is shown to come before
any work; the folder that would hold OUT is compared before and after, so neither OUT nor a
leftover beside it (staging folder, lock file) is written. Usage errors come from argparse as
``splice <verb>: error: ...``; the rest as ``splice: error: ...``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
from conftest import make_tiny
from surgery_helpers import word_text

from splice.cli import main
from splice.errors import SpliceError


# ---- helpers -------------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and mtime (to see writes and deletions)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            st = (Path(root) / name).lstat()
            out[str(Path(root) / name)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or training a zoo fails the test: every case is refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded (or a zoo trained) before the input was checked")

    monkeypatch.setattr("splice.modeling.load_causal_lm", refuse)
    monkeypatch.setattr(importlib.import_module("splice.zoo.build"), "_build_into", refuse)


def fails(capsys, argv: list, needle: str, out: Path) -> str:
    """Run ``argv``: exit 2, one line naming ``needle``, nothing written at or beside ``out``."""
    before = snapshot(out.parent)
    rc = main([str(a) for a in argv])
    stdout, err = capsys.readouterr()
    assert rc == 2, (argv, stdout, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert err.startswith(("splice: error: ", "splice ")) and ": error: " in err, err
    assert needle in err, (needle, err)
    assert not out.exists()
    assert snapshot(out.parent) == before, "something was written beside OUT"
    return err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama (hidden 32, k/v projections 16 x 32), a tiny Mixtral, texts and missing
    paths; kept apart from each test's ``tmp_path``, where OUT goes."""
    root = tmp_path_factory.mktemp("bad_surgery")
    text, short = root / "text.txt", root / "short.txt"
    text.write_text(word_text(words=2000, seed=4))
    short.write_text("w1 w2 w3 w4 w5\n")  # 6 tokens with BOS: less than one window of 16
    return {
        "MODEL": make_tiny(root / "llama", "llama", seed=1),
        "MOE": make_tiny(root / "moe", "mixtral", seed=2),
        "TEXT": text,
        "SHORT": short,
        "MISSING": root / "missing.txt",
        "NOZOO": root / "no_zoo",
    }


def argv(inputs: dict[str, Path], out: Path, args: list) -> list:
    """``args`` with MODEL, MOE, TEXT, SHORT, MISSING, NOZOO and OUT put in."""
    return [out if a == "OUT" else inputs.get(a, a) for a in args]


#: each verb with the least it needs to run; calibration windows of 16 tokens
VERBS = {
    "heal": ["heal", "MODEL", "OUT", "--calibration", "TEXT", "--steps", "2", "--seq-len", "16",
             "--batch-size", "2", "--device", "cpu"],
    "upscale": ["upscale", "MODEL", "OUT", "--solar", "1", "--seq-len", "16"],
    "upscale_yi": ["upscale", "MODEL", "OUT", "--yi", "1", "--calibration", "TEXT",
                   "--seq-len", "16"],
    "prune": ["prune", "MODEL", "OUT", "--n", "1", "--calibration", "TEXT", "--seq-len", "16"],
    "slice": ["slice", "MODEL", "OUT", "--calibration", "TEXT", "--seq-len", "16"],
    "collapse": ["collapse", "MOE", "OUT", "--method", "slice", "--calibration", "TEXT",
                 "--seq-len", "16"],
    "eval": ["eval", "MODEL", "--ppl", "TEXT", "--seq-len", "16"],
    "activations": ["analyze", "activations", "MODEL", "--calibration", "TEXT", "--seq-len",
                    "16", "--out", "OUT"],
}  # fmt: skip


# ---- 1. numeric options: NaN, inf, negative, out of range, with the limit named ------------------
NUMBERS = [
    ("heal", ["--weight-decay", "nan"], "--weight-decay must be a finite number from 0 to 1"),
    ("heal", ["--weight-decay", "-1"], "--weight-decay must be a finite number from 0 to 1"),
    ("heal", ["--weight-decay", "inf"], "--weight-decay must be a finite number from 0 to 1"),
    ("heal", ["--lr", "nan"], "--lr must be a positive finite number, at most 1, got nan"),
    ("heal", ["--lr", "-0.001"], "--lr must be a positive finite number, at most 1"),
    ("heal", ["--lr", "10"], "--lr must be a positive finite number, at most 1, got 10.0"),
    ("heal", ["--warmup", "3"], "--warmup must be a whole number from 0 to 2 (--steps 2)"),
    ("heal", ["--warmup", "-1"], "--warmup must be a whole number from 0 to 2"),
    ("heal", ["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295"),
    ("heal", ["--seed", str(2**64)], "--seed must be a whole number from 0 to 4294967295"),
    ("heal", ["--seed", "9" * 400], "--seed must be a whole number from 0 to 4294967295"),
    ("heal", ["--steps", "10000000000"], "--steps must be a whole number from 1 to 1000000"),
    ("heal", ["--batch-size", "10000000000"], "--batch-size must be a whole number from 1 to"),
    ("heal", ["--seq-len", "1"], "seq_len must be a whole number of 2 or more"),
    ("heal", ["--max-tokens", "8"], "--max-tokens must be a whole number of 16 or more"),
    ("heal", ["--lora", "2", "--lora-alpha", "nan"], "--lora-alpha must be a positive finite"),
    ("heal", ["--lora", "2", "--lora-alpha", "-2"], "--lora-alpha must be a positive finite"),
    ("heal", ["--train-dtype", "int8"], "--train-dtype int8: the model runs in float32"),
    ("heal", ["--dtype", "int8"], "--dtype int8: weights can be converted to bfloat16"),
    ("heal", ["--threads", "10000000000"], "argument --threads: '10000000000' must be at most"),
    ("heal", ["--lr", "fast"], "argument --lr: 'fast' is not a number"),
    ("upscale", ["--dtype", "int8"], "--dtype int8: weights can be converted to"),
    ("upscale", ["--threads", "0"], "argument --threads: '0' must be 1 or more"),
    ("upscale_yi", ["--calibration-dtype", "int8"], "--calibration-dtype int8: the model runs"),
    ("prune", ["--calibration-dtype", "int8"], "--calibration-dtype int8: the model runs in"),
    ("prune", ["--max-samples", "0"], "argument --max-samples: '0' must be 1 or more"),
    ("prune", ["--dtype", "uint8"], "--dtype uint8: weights can be converted to"),
    ("slice", ["--sparsity", "nan"], "--sparsity nan: must be in [0, 1)"),
    ("slice", ["--sparsity", "inf"], "--sparsity inf: must be in [0, 1)"),
    ("slice", ["--sparsity", "-0.5"], "--sparsity -0.5: must be in [0, 1)"),
    ("slice", ["--seq-len", "1"], "seq_len must be a whole number of 2 or more"),
    ("collapse", ["--ridge", "nan"], "--ridge must be a finite number from 0 to 100"),
    ("collapse", ["--ridge", "-1"], "--ridge must be a finite number from 0 to 100"),
    ("collapse", ["--ridge", "1e300"], "--ridge must be a finite number from 0 to 100"),
    ("collapse", ["--calibration-dtype", "int8"], "--calibration-dtype int8: the model runs"),
    ("collapse", ["--dtype", "int8"], "--dtype int8: weights can be converted to"),
    ("eval", ["--compute-dtype", "int8"], "--compute-dtype int8: the model runs in float32"),
    ("eval", ["--seq-len", "100"], "seq_len 100 exceeds the model's 64 positions"),
    ("eval", ["--stride", "99"], "stride 99 is longer than the window (16 tokens)"),
    ("activations", ["--threads", "10000000000"], "'10000000000' must be at most"),
]


@pytest.mark.parametrize(("verb", "extra", "needle"), NUMBERS, ids=lambda v: str(v))
def test_numeric_options_are_checked_before_any_work(
    verb, extra, needle, inputs, tmp_path, capsys, no_work
):
    out = tmp_path / "out"
    fails(capsys, argv(inputs, out, [*VERBS[verb], *extra]), needle, out)


# ---- 2. a LoRA rank above the adapted matrices' smaller side -------------------------------------
@pytest.mark.parametrize(
    ("model", "extra", "needle"),
    [
        ("MODEL", ["--lora", "5000"], "--lora 5000: the rank must be at most 16, the smallest"),
        ("MODEL", ["--lora", "17"], "(model.layers.0.self_attn.k_proj.weight is 16x32)"),
        ("MODEL", ["--lora", "17", "--train-layers", "2"], "(model.layers.2.self_attn.k_proj"),
        ("MOE", ["--lora", "17"], "--lora 17: the rank must be at most 16"),
    ],
)
def test_lora_rank_is_limited_by_the_adapted_matrices(
    model, extra, needle, inputs, tmp_path, capsys, no_work
):
    pytest.importorskip("peft", reason="peft (the lora extra) is needed for --lora")
    out = tmp_path / "out"
    args = [a if a != "MODEL" else model for a in VERBS["heal"]]
    fails(capsys, argv(inputs, out, [*args, *extra]), needle, out)


# ---- 3. file, task and zoo options: checked before OUT is written, not after ---------------------
SCORING = [
    (["--ppl", "MISSING"], "missing.txt: no such text file"),
    (["--ppl", "SHORT"], "short.txt: the text is too short: 6 tokens, fewer than one window of 16"),
    (["--tasks", "zoo_cooking"], "unknown zoo task zoo_cooking; choose from: zoo_math"),
    (["--tasks", "zoo_math", "--zoo", "NOZOO"], "no_zoo: not a built zoo (no tasks/)"),
]
FILES = [
    (verb, extra, needle)
    for verb in ("heal", "upscale", "prune", "slice", "collapse")
    for extra, needle in SCORING
] + [
    ("heal", ["--calibration", "MISSING"], "--calibration"),
    ("upscale_yi", ["--calibration", "MISSING"], "missing.txt: no such calibration file"),
    ("prune", ["--calibration", "MISSING"], "missing.txt: no such calibration file"),
    ("slice", ["--calibration", "MISSING"], "missing.txt: no such calibration file"),
    ("collapse", ["--calibration", "MISSING"], "missing.txt: no such calibration file"),
    ("eval", ["--ppl", "SHORT"], "short.txt: the text is too short: 6 tokens"),
    ("eval", ["--ppl", "MISSING"], "missing.txt: no such text file"),
    ("eval", ["--tasks", "zoo_cooking"], "unknown zoo task zoo_cooking"),
    ("eval", ["--tasks", "zoo_math", "--zoo", "NOZOO"], "not a built zoo"),
]


@pytest.mark.parametrize(("verb", "extra", "needle"), FILES, ids=lambda v: str(v))
def test_files_tasks_and_zoo_are_checked_before_out_is_written(
    verb, extra, needle, inputs, tmp_path, capsys, no_work
):
    out = tmp_path / "out"
    fails(capsys, argv(inputs, out, [*VERBS[verb], *extra]), needle, out)


# ---- 4. a calibration text shorter than one window: every verb refuses it alike ------------------
@pytest.mark.parametrize(
    "verb", ["activations", "activations_compare", "upscale_yi", "prune", "slice", "collapse"]
)
def test_short_calibration_is_refused_alike(verb, inputs, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    args = VERBS["activations"] if verb == "activations_compare" else VERBS[verb]
    args = [a if a != "TEXT" else "SHORT" for a in args]
    if verb == "activations_compare":
        args = [*args, "--compare", "MODEL"]
    needle = (
        f"--calibration {inputs['SHORT']}: the text is too short: 6 tokens, fewer than one "
        "window of 16 (give a longer text or a smaller --seq-len)"
    )
    fails(capsys, argv(inputs, out, args), needle, out)


# ---- 5. zoo build / zoo eval numbers -------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--steps-scale", "1e308"], "--steps-scale must be a positive finite number, at most 100"),
        (["--steps-scale", "101"], "--steps-scale must be a positive finite number, at most 100"),
        (["--steps-scale", "nan"], "--steps-scale must be a positive finite number"),
        (["--seed", str(2**32)], "--seed must be a whole number from 0 to 4294967295"),
        (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295"),
        (["--seed", "1.5"], "argument --seed: '1.5' is not a whole number"),
    ],
)
def test_zoo_build_numbers_are_checked_before_any_work(extra, needle, tmp_path, capsys, no_work):
    out = tmp_path / "zoo"
    fails(capsys, ["zoo", "build", out, "--no-progress", *extra], needle, out)


# ---- the same checks for Python callers ----------------------------------------------------------
def test_library_functions_check_their_numbers(inputs, tmp_path, no_work):
    from splice.surgery import heal
    from splice.zoo import build

    out = tmp_path / "out"
    base = dict(text=inputs["TEXT"], steps=2, seq_len=16, batch_size=2)
    for bad, needle in [
        (dict(weight_decay=float("nan")), "--weight-decay must be"),
        (dict(weight_decay=-1.0), "--weight-decay must be"),
        (dict(lr=float("inf")), "--lr must be"),
        (dict(warmup=5), "--warmup must be"),
        (dict(seed=-3), "--seed must be"),
        (dict(lora=999), "--lora 999: the rank must be at most 16"),
    ]:
        with pytest.raises(SpliceError, match=needle):
            heal(inputs["MODEL"], out, **{**base, **bad})
    with pytest.raises(SpliceError, match="at most 100"):
        build(tmp_path / "zoo", steps_scale=1e308, show_progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", ["MemoryError", "OutOfMemoryError"])
def test_out_of_memory_is_one_line(monkeypatch, capsys, error):
    """A size that passed every check but does not fit: one line, exit 2, no traceback."""
    import argparse

    import torch

    from splice import cli

    exc = MemoryError() if error == "MemoryError" else torch.OutOfMemoryError("CUDA out of memory")

    def fails(_args: argparse.Namespace) -> None:
        raise exc

    real = cli.build_parser

    def parser(first):
        p = real(first)
        p.set_defaults(func=fails)
        for action in p._subparsers._group_actions if p._subparsers else []:
            for sub in action.choices.values():
                sub.set_defaults(func=fails)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    assert cli.main(["inspect", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of" in err[0] and "memory" in err[0], err
