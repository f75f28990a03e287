"""Output targets (splice.target): --overwrite never destroys what is not a model, one writer per
target, atomic replacement, kills leave nothing that the next run does not clean up, and every
fault of the target (path, permissions, full disk) is one line with exit code 2.

One test per class of fault, through the real CLI where a user would meet it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from splice import target as target_mod
from splice.cli import main
from splice.errors import SpliceError
from splice.target import check_target, clean_stale, lock_target

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes): 'nothing deleted' is equality."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("splice: error:"), err
    return lines[0]


def no_litter(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if ".splice-" in p.name or ".zoo-" in p.name]
    assert left == [], left


@pytest.fixture
def model(tiny_models, tmp_path) -> Path:
    """A private copy of the tiny Llama inside ``tmp_path/work/llama``."""
    dst = tmp_path / "work" / "llama"
    shutil.copytree(tiny_models["llama"], dst)
    return dst


def recipe_for(model: Path, folder: Path) -> Path:
    r = folder / "recipe.yml"
    r.write_text(
        f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {model}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )
    return r


# ---- --overwrite: what may be replaced -------------------------------------------------------
@pytest.mark.parametrize("verb", ["convert", "merge"])
def test_overwrite_refuses_the_input_and_its_ancestors(model, tmp_path, capsys, verb):
    work = model.parent
    (work / "thesis.tex").write_text("two years of work")
    recipe = recipe_for(model, tmp_path)
    before = snapshot(tmp_path)
    for out in (model, work, tmp_path):
        args = [str(model) if verb == "convert" else str(recipe), str(out), "--overwrite"]
        assert main([verb, *args, "--no-progress"]) == 2
        line = one_error_line(capsys)
        assert "input" in line or "current folder" in line, line
        assert snapshot(tmp_path) == before
    no_litter(work)


@pytest.mark.parametrize("verb", ["convert", "merge"])
def test_overwrite_refuses_the_current_folder(model, tmp_path, capsys, monkeypatch, verb):
    out = tmp_path / "here"
    out.mkdir()
    (out / "config.json").write_text("{}")  # even a model-looking current folder
    monkeypatch.chdir(out)
    recipe = recipe_for(model, tmp_path)
    before = snapshot(tmp_path)
    src = str(model) if verb == "convert" else str(recipe)
    for target in (".", str(out), "..", "./"):
        assert main([verb, src, target, "--overwrite", "--no-progress"]) == 2
        assert "current folder" in one_error_line(capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "content",
    [
        {"thesis.tex": b"x"},  # a user's folder
        {"config.json": b"{}", "notes.txt": b"mine"},  # a model folder with a user's file in it
        {"config.json": b"{}", "runs/log": b"mine"},  # ... or a sub-folder
    ],
    ids=["user-files", "model-plus-file", "model-plus-folder"],
)
@pytest.mark.parametrize("verb", ["convert", "merge"])
def test_overwrite_refuses_folders_with_non_model_files(model, tmp_path, capsys, content, verb):
    out = tmp_path / "out"
    for name, data in content.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    src = str(model) if verb == "convert" else str(recipe_for(model, tmp_path))
    assert main([verb, src, str(out), "--overwrite", "--no-progress"]) == 2
    assert "--overwrite refused" in one_error_line(capsys)
    assert snapshot(out) == content
    no_litter(tmp_path)


def test_overwrite_replaces_a_model_folder_and_empty_folders(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(model), str(out), "--no-progress"]) == 0
    (out / "model.safetensors.index.json").write_text("{}")  # a stale file of an older output
    assert main(["convert", str(model), str(out), "--overwrite", "--no-progress"]) == 0
    assert not (out / "model.safetensors.index.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", str(model), str(empty), "--overwrite", "--no-progress"]) == 0
    assert (empty / "config.json").is_file()
    no_litter(tmp_path)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replacement_keeps_the_old_folder_until_the_new_one_is_in(
    model, tmp_path, monkeypatch, exchange
):
    """The old output is intact at the moment the new one appears, and gone afterwards."""
    out = tmp_path / "out"
    main(["convert", str(model), str(out), "--no-progress"])
    old_bytes = snapshot(out)
    if not exchange:
        monkeypatch.setattr(target_mod, "_exchange", lambda a, b: False)
    seen = {}
    real_replace = os.replace

    def spy(a, b):
        if Path(b) == out:  # the new folder goes in: the old one must still exist somewhere
            moved = [p for p in tmp_path.iterdir() if p.name.startswith(".out.splice-old-")]
            seen["old intact"] = bool(moved) and snapshot(moved[0]) == old_bytes
        real_replace(a, b)

    monkeypatch.setattr(target_mod.os, "replace", spy)
    main(["convert", str(model), str(out), "--overwrite", "--dtype", "bfloat16", "--no-progress"])
    assert snapshot(out) != old_bytes
    if not exchange:
        assert seen == {"old intact": True}
    no_litter(tmp_path)


# ---- target paths -------------------------------------------------------------------------------
def test_bad_target_paths_are_one_line(model, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    cases = {
        "": "empty",
        str(tmp_path / "afile"): "not a folder",
        str(tmp_path / "afile" / "out"): "not a folder",
        str(tmp_path / "afile" / "deeper" / "out"): "not a folder",
    }
    before = snapshot(tmp_path)
    for out, words in cases.items():
        assert main(["convert", str(model), out, "--no-progress"]) == 2
        assert words in one_error_line(capsys)
    assert snapshot(tmp_path) == before


def test_a_failed_run_leaves_no_parent_folders(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    assert main(["convert", str(tmp_path / "missing"), str(out), "--no-progress"]) == 2
    one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def mounted_tmpfs(where: Path, *options: str):
    where.mkdir()
    opts = ",".join(options)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_target_is_one_line(model, tmp_path, capsys):
    ro = tmp_path / "ro"
    if IS_ROOT:  # root ignores permission bits: use a read-only file system
        ctx = mounted_tmpfs(ro, "ro", "size=1m")
    else:
        ro.mkdir()
        ro.chmod(0o555)
        ctx = contextlib.nullcontext(ro)
    with ctx:
        assert main(["convert", str(model), str(ro / "out"), "--no-progress"]) == 2
        line = one_error_line(capsys)
        assert "Read-only file system" in line or "Permission denied" in line
        assert list(ro.iterdir()) == []


@pytest.mark.skipif(not IS_ROOT, reason="needs root to mount a small tmpfs (a full disk)")
@pytest.mark.parametrize("dtype", [None, "float16"], ids=["kernel-copy", "cast"])
def test_full_disk_is_one_line_and_nothing_written(model, tmp_path, capsys, dtype):
    with mounted_tmpfs(tmp_path / "small", "size=64k") as small:
        extra = ["--dtype", dtype] if dtype else []
        assert main(["convert", str(model), str(small / "out"), "--no-progress", *extra]) == 2
        line = one_error_line(capsys)
        assert f"no space left on {small}" in line and "nothing written" in line
        assert list(small.iterdir()) == []


# ---- one writer per target ------------------------------------------------------------------
def test_a_second_run_into_a_locked_target_is_refused_at_once(model, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from splice.target import lock_target\n"
            f"with lock_target({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = recipe_for(model, tmp_path)
        for args in (["convert", str(model)], ["merge", str(recipe)]):
            t0 = time.monotonic()
            assert main([*args, str(out), "--no-progress"]) == 2
            line = one_error_line(capsys)
            assert "another splice run is writing it" in line and f"pid {holder.pid}" in line
            assert time.monotonic() - t0 < 30  # refused before merging anything
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["convert", str(model), str(out), "--no-progress"]) == 0  # a dead holder's lock
    no_litter(tmp_path)


def test_lock_is_reentrant_in_one_process(tmp_path):
    with lock_target(tmp_path / "o"), lock_target(tmp_path / "o"):
        assert (tmp_path / ".o.splice-lock").exists()
    assert not (tmp_path / ".o.splice-lock").exists()


# ---- kills and stale temporary folders --------------------------------------------------------
KILL_SCRIPT = """
import os, signal, sys
from splice import writer
from splice.cli import main
count = 0
def killing(real):
    def method(self, *args, **kwargs):
        global count
        count += 1
        if count == 3:  # mid-write: some tensors are in the temporary folder, most are not
            os.kill(os.getpid(), signal.{sig})
        return real(self, *args, **kwargs)
    return method
writer.CheckpointWriter.copy = killing(writer.CheckpointWriter.copy)
writer.CheckpointWriter.write = killing(writer.CheckpointWriter.write)
sys.exit(main([{verb!r}, {src!r}, {out!r}, "--no-progress", "--max-shard-size", "8KB"] + {extra!r}))
"""


def run_killed(
    src: Path, out: Path, sig: str, extra: list[str] = (), verb: str = "convert"
) -> subprocess.CompletedProcess:
    script = textwrap.dedent(KILL_SCRIPT).format(
        sig=sig, src=str(src), out=str(out), extra=list(extra), verb=verb
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("verb", ["convert", "merge"])
def test_sigterm_mid_write_cleans_up_and_exits_143(model, tmp_path, verb):
    src = model if verb == "convert" else recipe_for(model, model.parent)
    proc = run_killed(src, tmp_path / "out", "SIGTERM", verb=verb)
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr and "SIGTERM" in proc.stderr
    assert list(tmp_path.iterdir()) == [model.parent]  # no target, no temporary folder, no lock


def test_sigkill_mid_write_then_rerun_leaves_no_temporary_folder(model, tmp_path):
    out = tmp_path / "out"
    proc = run_killed(model, out, "SIGKILL")
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.splice-tmp-")]
    assert len(stale) == 1 and any(stale[0].iterdir())  # the litter a kill leaves ...
    rerun = subprocess.run(
        [sys.executable, "-m", "splice.cli", "convert", str(model), str(out), "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert "removed .out.splice-tmp-" in rerun.stderr  # ... is removed by the next run, with a note
    assert (out / "config.json").is_file()
    no_litter(tmp_path)


def test_sigkill_during_overwrite_keeps_the_old_output(model, tmp_path):
    """Killed while replacing: OUT is the old output (untouched) and the next run cleans up."""
    out = tmp_path / "out"
    main(["convert", str(model), str(out), "--no-progress"])
    old = snapshot(out)
    proc = run_killed(model, out, "SIGKILL", ["--overwrite", "--dtype", "float16"])
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(out) == old
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "splice.cli",
            "convert",
            str(model),
            str(out),
            "--overwrite",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    no_litter(tmp_path)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_stale_removes_dead_writers_folders_only(tmp_path, capsys):
    out = tmp_path / "out"
    gone, alive = dead_pid(), os.getppid()
    for name in (
        f".out.splice-tmp-{gone}-abc",
        f".out.zoo-tmp-{gone}-x",
        f".out.splice-tmp-{alive}-y",
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    (tmp_path / f".other.splice-tmp-{gone}-z").mkdir()  # another target's: not ours to judge
    removed = clean_stale(out)
    assert sorted(p.name for p in removed) == sorted(
        [f".out.splice-tmp-{gone}-abc", f".out.zoo-tmp-{gone}-x"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".out.splice-tmp-{alive}-y", f".other.splice-tmp-{gone}-z"]
    )
    assert capsys.readouterr().err.count("splice: note: removed") == 2


def test_an_interrupted_swap_is_undone(model, tmp_path, capsys):
    """Old output set aside by a run that died before putting the new one in: it comes back."""
    out = tmp_path / "out"
    main(["convert", str(model), str(out), "--no-progress"])
    old = snapshot(out)
    aside = tmp_path / f".out.splice-old-{dead_pid()}-q"
    os.replace(out, aside)
    (tmp_path / f".out.splice-tmp-{dead_pid()}-r").mkdir()
    capsys.readouterr()
    assert main(["convert", str(model), str(out), "--no-progress"]) == 2  # OUT is back: exists
    err = capsys.readouterr().err
    assert "restored" in err and "already exists" in err
    assert snapshot(out) == old
    no_litter(tmp_path)


def test_check_target_as_a_library_function(model, tmp_path):
    """The same refusals from Python (a notebook gets them too)."""
    with pytest.raises(SpliceError, match="input of this run"):
        check_target(model, overwrite=True, inputs=[model])
    with pytest.raises(SpliceError, match="ancestor of the input"):
        check_target(model.parent, overwrite=True, inputs=[model])
    assert check_target(tmp_path / "new", inputs=[model]) == tmp_path / "new"
    # a verb whose output is not a model (an analysis report) gives its own rule
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.md").write_text("keep")
    with pytest.raises(SpliceError, match="--overwrite refused: not mine; nothing was deleted"):
        check_target(notes, overwrite=True, replaceable=lambda folder: "not mine")
    assert check_target(notes, overwrite=True, replaceable=lambda folder: None) == notes
    with pytest.raises(SpliceError, match="current folder"):
        check_target(Path.cwd(), overwrite=True, replaceable=lambda folder: None)


def test_a_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    """Without renameat2: if the new folder cannot be moved in, the old one goes back."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    tmp = target_mod.staging_dir(out)
    (tmp / "config.json").write_text('{"new": 1}')
    monkeypatch.setattr(target_mod, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def failing(a, b):
        if Path(a) == tmp:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(a, b)

    monkeypatch.setattr(target_mod.os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error"):
        target_mod.commit(tmp, out)
    assert (out / "config.json").read_text() == "{}"
    assert not [p.name for p in tmp_path.iterdir() if "-old-" in p.name]


# ---- zoo build: the same promises for its folder --------------------------------------------
def test_zoo_build_never_replaces_a_foreign_folder_even_with_force(tmp_path, capsys):
    from splice.zoo.build import STAMP_FILE

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    zoo_plus = tmp_path / "zoo_plus"  # a zoo someone dropped a file into
    zoo_plus.mkdir()
    shutil.copy(Path(__file__).parents[1] / "assets" / "zoo" / STAMP_FILE, zoo_plus)
    (zoo_plus / "notes.md").write_text("mine")
    for folder in (foreign, zoo_plus):
        before = snapshot(folder)
        assert main(["zoo", "build", str(folder), "--force", "--no-progress"]) == 2
        assert "nothing was deleted" in one_error_line(capsys)
        assert snapshot(folder) == before
    no_litter(tmp_path)


@pytest.mark.parametrize("dtype", ["int8", "bool", "float8_e4m3fn", "banana"])
def test_convert_refuses_dtypes_that_would_ruin_the_weights(model, tmp_path, capsys, dtype):
    assert main(["convert", str(model), str(tmp_path / "out"), "--dtype", dtype]) == 2
    assert "dtype" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["work"]


# ---- one claim per run: locked and checked once, the claim handed to the writer --------------
@pytest.fixture
def claims(monkeypatch) -> dict[str, list[Path]]:
    """Every ``lock_target`` and ``check_target`` call (re-entrant ones too), by target, through
    every module that imported them."""
    import splice.convert
    import splice.merge.runner
    import splice.output
    import splice.surgery.depth
    import splice.writer  # noqa: F401

    calls: dict[str, list[Path]] = {"lock": [], "check": []}

    def counting(kind, real):
        def wrapper(out, *args, **kwargs):
            calls[kind].append(Path(os.path.abspath(out)))
            return real(out, *args, **kwargs)

        return wrapper

    for kind, name in (("lock", "lock_target"), ("check", "check_target")):
        real = getattr(target_mod, name)
        wrapper = counting(kind, real)
        for mod in list(sys.modules.values()):
            if getattr(mod, name, None) is real:
                monkeypatch.setattr(mod, name, wrapper)
    return calls


def test_a_merge_claims_its_output_once(model, tmp_path, claims):
    out = tmp_path / "out"
    assert main(["merge", str(recipe_for(model, tmp_path)), str(out), "--no-progress"]) == 0
    assert claims == {"lock": [out], "check": [out]}


def test_a_multi_document_merge_claims_each_output_once(model, tmp_path, claims):
    first = {"merge_method": "linear", "models": [{"model": str(model)}, {"model": str(model)}]}
    final = {"merge_method": "linear", "models": [{"model": "first"}, {"model": str(model)}]}
    docs = [{**final, "dtype": "float32"}, {**first, "name": "first", "dtype": "float32"}]
    recipe = tmp_path / "multi.yml"
    recipe.write_text(
        "\n---\n".join(json.dumps({**d, "parameters": {"weight": 0.5}}) for d in docs)
    )
    out, keep = tmp_path / "out", tmp_path / "keep"
    args = ["merge", str(recipe), str(out), "--keep-intermediates", str(keep), "--no-progress"]
    assert main(args) == 0
    assert sorted(claims["lock"]) == [keep / "first", out]
    # keep/first: checked with the others before any merge runs, again when claimed
    assert sorted(claims["check"]) == [keep / "first", keep / "first", out]


def test_convert_and_surgery_claim_their_output_once(model, tmp_path, claims):
    from splice.surgery.prune import prune
    from splice.surgery.upscale import upscale

    for name, run in (
        ("c", lambda o: main(["convert", str(model), str(o), "--no-progress"])),
        ("u", lambda o: upscale(model, o, layers="0:2,3,1:4")),
        ("p", lambda o: prune(model, o, drop="1")),
    ):
        out = tmp_path / name
        run(out)
        assert claims == {"lock": [out], "check": [out]}, name
        assert (out / "config.json").is_file()
        claims["lock"].clear()
        claims["check"].clear()


def test_the_writer_claims_a_path_itself_and_takes_a_claim_as_it_is(tmp_path, claims):
    import torch

    from splice.writer import CheckpointWriter, TensorSpec

    specs = [TensorSpec("a", (2,), "float32")]
    with CheckpointWriter(tmp_path / "o", specs) as w:  # called on a path: claims it
        w.write("a", torch.zeros(2))
        w.write_config({})
    assert claims == {"lock": [tmp_path / "o"], "check": [tmp_path / "o"]}
    with target_mod.claim_output(tmp_path / "o", overwrite=True) as claim:
        assert claims["check"] == [tmp_path / "o"]  # no inputs yet: checked when they are known
        with CheckpointWriter(claim, specs, inputs=[tmp_path / "in"]) as w:
            w.write("a", torch.ones(2))
            w.write_config({})
        with pytest.raises(SpliceError, match="is an input of this run"):
            claim.check([tmp_path / "o"])
    assert len(claims["lock"]) == 2 and len(claims["check"]) == 2
    with pytest.raises(RuntimeError, match="released"):
        claim.check()
