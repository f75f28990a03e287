"""Hostile inputs to ``splice analyze`` and ``splice zoo``: one line on stderr, exit 2, no trace.

Every case drives the real CLI (``splice.cli.main``) and checks that nothing was written and
nothing deleted. Usage errors (a bad ``--threads``) come from argparse as
``splice <verb>: error: ...``; the rest as ``splice: error: ...``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import held_lock, make_tiny
from safetensors.torch import load_file, save_file

from splice.cli import main
from splice.errors import SpliceError

UP0 = "model.layers.0.mlp.up_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"


# ---- helpers -------------------------------------------------------------------------------------
def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folders`` with its size and mtime (to see writes and deletions)."""
    out = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                p = Path(root) / name
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def run(argv: list[str]) -> int:
    return main([str(a) for a in argv])


def fails(capsys, argv: list, *needles: str, watch: tuple[Path, ...] = (), usage=False) -> str:
    """Run ``argv``: exit 2, one line naming ``needles``, nothing under ``watch`` changed."""
    before = snapshot(*watch)
    rc = run(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (argv, out, err)
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    if usage:  # argparse: "splice analyze weights: error: argument --threads: ..."
        assert err.startswith("splice ") and ": error: " in err, err
    else:
        assert err.startswith("splice: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert snapshot(*watch) == before, "something was written or deleted"
    return err


def no_litter(folder: Path) -> None:
    """No staging folder (``.NAME.report-tmp-PID-*``) or lock file left behind."""
    assert not [p.name for p in folder.iterdir() if ".report-" in p.name or "-lock" in p.name]


def edit_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Unsharded tiny models: clean, with NaN, with inf, pickled, a MoE with a NaN expert."""
    root = tmp_path_factory.mktemp("hostile")
    clean = make_tiny(root / "clean", "llama", seed=3)

    def nan(sd):
        sd[UP0].view(-1)[:3] = float("nan")

    def inf(sd):
        sd[Q1].view(-1)[4:6] = float("inf")

    pickled = root / "pickled"
    shutil.copytree(clean, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    moe = make_tiny(root / "moe_clean", "mixtral", seed=4)

    def nan_expert(sd):
        name = next(n for n in sd if "experts" in n)
        sd[name].view(-1)[0] = float("nan")

    text = root / "text.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(400)) + "\n")
    return {
        "clean": clean,
        "nan": edit_weights(clean, root / "nan", nan),
        "inf": edit_weights(clean, root / "inf", inf),
        "pickled": pickled,
        "moe": moe,
        "moe_nan": edit_weights(moe, root / "moe_nan", nan_expert),
        "text": text,
    }


def act(model: Path, text: Path, *more) -> list:
    return ["analyze", "activations", model, "--calibration", text, "--seq-len", "8", *more]


# ---- 1. non-finite weights -----------------------------------------------------------------------
def test_nan_and_inf_weights_are_named(models, tmp_path, capsys):
    out = tmp_path / "out"
    msg = f"{UP0} has 3 NaN values; analysis needs finite weights"
    fails(capsys, ["analyze", "weights", models["nan"], "--out", out], msg, watch=(tmp_path,))
    fails(capsys, ["analyze", "weights", models["clean"], models["nan"]], msg)
    fails(capsys, ["analyze", "weights", models["nan"], models["clean"]], msg)
    fails(capsys, ["analyze", "weights", models["inf"]], f"{Q1} has 2 inf values")
    fails(
        capsys,
        ["analyze", "experts", models["moe_nan"], "--out", out],
        "experts",
        "has 1 NaN values; analysis needs finite weights",
        watch=(tmp_path,),
    )
    fails(capsys, act(models["nan"], models["text"], "--out", out), msg, watch=(tmp_path,))
    assert not out.exists()


# ---- 2. --out ------------------------------------------------------------------------------------
def test_out_is_checked_first_and_written_atomically(models, tmp_path, capsys, monkeypatch):
    weights = ["analyze", "weights", models["clean"], "--metrics", "cosine", "--no-figures"]
    afile = tmp_path / "report.txt"
    afile.write_text("mine")
    fails(capsys, [*weights, "--out", afile], "exists and is not a folder", watch=(tmp_path,))
    fails(capsys, [*weights, "--out", afile, "--overwrite"], "not a folder", watch=(tmp_path,))
    fails(capsys, [*weights, "--out", afile / "x"], "is not a folder", watch=(tmp_path,))
    fails(capsys, [*weights, "--out", ""], "--out is empty", watch=(tmp_path,))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep")
    fails(capsys, [*weights, "--out", mine], "already exists (pass --overwrite", watch=(tmp_path,))
    fails(
        capsys,
        [*weights, "--out", mine, "--overwrite"],
        "--overwrite refused",
        "'notes.md'",
        "nothing was deleted",
        watch=(tmp_path,),
    )
    # a model folder is not a report either: --overwrite never deletes it
    fails(capsys, [*weights, "--out", models["clean"], "--overwrite"], "--overwrite refused")
    assert (models["clean"] / "model.safetensors").is_file()

    out = tmp_path / "rep"
    assert run([*weights, "--out", out]) == 0
    first = (out / "report.json").read_text()
    fails(capsys, [*weights, "--out", out], "already exists", watch=(tmp_path,))
    assert run([*weights, "--metrics", "cosine,frobenius", "--out", out, "--overwrite"]) == 0
    capsys.readouterr()
    second = (out / "report.json").read_text()
    assert second != first and "frobenius" in second
    no_litter(tmp_path)

    # a write that fails half way leaves the earlier report as it was, and no staging folder
    from splice.analysis.report import SimilarityReport

    real = SimilarityReport._write

    def broken(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SimilarityReport, "_write", broken)
    argv = [*weights, "--out", out, "--overwrite"]
    fails(capsys, argv, "no space left on", "nothing written", watch=(tmp_path,))
    fails(capsys, [*weights, "--out", tmp_path / "new"], "nothing written", watch=(tmp_path,))
    assert (out / "report.json").read_text() == second and not (tmp_path / "new").exists()
    no_litter(tmp_path)


def test_a_report_folder_being_written_is_refused(models, tmp_path, capsys):
    """One writer per --out: a second run while another process holds it is one line."""
    weights = ["analyze", "weights", models["clean"], "--metrics", "cosine", "--no-figures"]
    out = tmp_path / "rep"
    assert run([*weights, "--out", out]) == 0
    capsys.readouterr()
    first = (out / "report.json").read_text()
    with held_lock(out):
        argv = [*weights, "--out", out, "--overwrite"]
        fails(capsys, argv, "another splice run is writing it", watch=(tmp_path,))
    assert (out / "report.json").read_text() == first


def test_staging_folders_of_dead_runs_are_cleaned(models, tmp_path, capsys):
    """A killed run's staging folder goes with a note; a report it set aside is put back."""
    weights = ["analyze", "weights", models["clean"], "--metrics", "cosine", "--no-figures"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    out = tmp_path / "rep"
    tmp = tmp_path / f".rep.report-tmp-{dead.pid}-abcd"
    tmp.mkdir()
    (tmp / "report.json").write_text("{}")
    assert run([*weights, "--out", out]) == 0
    err = capsys.readouterr().err
    assert f"removed {tmp.name}" in err and f"process {dead.pid}, which is gone" in err
    assert not tmp.exists() and (out / "report.json").is_file()
    no_litter(tmp_path)

    # a replacement cut short between "old aside" and "new in": the old report comes back
    old = tmp_path / f".rep.report-old-{dead.pid}-efgh"
    out.rename(old)
    assert run([*weights, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"restored {out} from {old.name}" in err
    assert "already exists (pass --overwrite" in err
    assert (out / "report.json").is_file() and not old.exists()
    no_litter(tmp_path)


# ---- 3. list options -----------------------------------------------------------------------------
def test_unknown_list_entries_are_refused(models, zoo, tmp_path, capsys):
    clean = models["clean"]
    err = fails(capsys, ["analyze", "weights", clean, "--kinds", "mlp.up_proj,bogus"], "'bogus'")
    assert "choose from: " in err and "mlp.up_proj" in err and "self_attn.q_proj" in err
    fails(capsys, ["analyze", "weights", clean, models["nan"], "--kinds", "nope"], "'nope'")
    fails(capsys, ["analyze", "weights", clean, "--kinds", ","], "--kinds names no tensor kind")
    fails(capsys, ["analyze", "weights", clean, "--metrics", ","], "no similarity metric named")
    fails(capsys, ["analyze", "experts", models["moe"], "--metrics", "cos"], "unknown", "'cos'")
    fails(capsys, ["zoo", "eval", zoo / "lang", "--zoo", zoo, "--tasks", ","], "(none)")
    fails(capsys, ["zoo", "eval", zoo / "lang", "--zoo", zoo, "--tasks", "zoo_x"], "zoo_x")


# ---- 4. --allow-pickle and from_pretrained's switches --------------------------------------------
def test_allow_pickle_is_honoured(models, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    pickled, text = models["pickled"], models["text"]
    for argv in (
        act(pickled, text),
        ["analyze", "weights", pickled],
        ["analyze", "weights", pickled, models["clean"]],
    ):
        fails(capsys, argv, "pickled .bin", "--allow-pickle")
    out = tmp_path / "w"
    assert (
        run(["analyze", "weights", pickled, models["clean"], "--allow-pickle", "--out", out]) == 0
    )
    assert json.loads((out / "report.json").read_text())["records"]

    calls: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    assert run(act(pickled, text, "--allow-pickle", "--max-samples", "2")) == 0
    assert "io_cosine" in capsys.readouterr().out
    assert calls[-1]["use_safetensors"] is None and calls[-1]["weights_only"] is True
    assert calls[-1]["trust_remote_code"] is False
    assert run(act(models["clean"], text, "--max-samples", "2")) == 0
    assert calls[-1]["use_safetensors"] is True and calls[-1]["trust_remote_code"] is False


def test_custom_code_needs_trust_remote_code(models, tmp_path, capsys):
    custom = tmp_path / "custom"
    shutil.copytree(models["clean"], custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg.update(model_type="xllama", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (custom / "config.json").write_text(json.dumps(cfg))
    fails(capsys, act(custom, models["text"]), "auto_map", "--trust-remote-code")


# ---- 5. counts and devices -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        ["--threads", "0"],
        ["--threads", "-1"],
        ["--threads", "two"],
        ["--max-samples", "0"],
        ["--batch-size", "-3"],
        ["--seq-len", "1"],
    ],
)
def test_bad_counts(models, tmp_path, capsys, extra):
    fails(
        capsys,
        act(models["clean"], models["text"], "--out", tmp_path / "o", *extra),
        extra[0],
        usage=True,
        watch=(tmp_path,),
    )


@pytest.mark.parametrize("device", ["banana", "meta", "cuda:7", "cuda:x"])
def test_bad_devices(models, tmp_path, capsys, device):
    for argv in (
        ["analyze", "weights", models["clean"]],
        act(models["clean"], models["text"]),
    ):
        fails(capsys, [*argv, "--device", device, "--out", tmp_path / "o"], f"--device {device}")
    assert not (tmp_path / "o").exists()


def test_bad_activation_dtype(models, capsys):
    argv = act(models["clean"], models["text"], "--calibration-dtype")
    fails(capsys, [*argv, "int8"], "--calibration-dtype int8")
    fails(capsys, [*argv, "f7"], "unknown dtype")


# ---- 6. zoo build --steps-scale ------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "0", "-1", "lots"])
def test_zoo_build_bad_steps_scale(tmp_path, capsys, scale):
    fails(
        capsys,
        ["zoo", "build", tmp_path / "z", "--steps-scale", scale, "--no-progress"],
        "--steps-scale",
        usage=True,
        watch=(tmp_path,),
    )
    assert not (tmp_path / "z").exists()


def test_zoo_build_api_bad_steps_scale(tmp_path):
    from splice.zoo import build

    for scale in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(SpliceError, match="--steps-scale must be a positive finite number"):
            build(tmp_path / "z", steps_scale=scale, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_zoo_build_empty_dir(capsys):
    fails(capsys, ["zoo", "build", "", "--no-progress"], "folder name is empty")


# ---- 7. zoo eval ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken(zoo, models, tmp_path_factory) -> dict[str, Path]:
    """Copies of zoo/lang, each broken one way."""
    root = tmp_path_factory.mktemp("broken")
    lang = zoo / "lang"

    def copy(name: str) -> Path:
        return Path(shutil.copytree(lang, root / name))

    out = {"missing": root / "missing"}
    out["no_config"] = copy("no_config")
    (out["no_config"] / "config.json").unlink()
    out["bad_config"] = copy("bad_config")
    (out["bad_config"] / "config.json").write_text("{not json")
    out["list_config"] = copy("list_config")
    (out["list_config"] / "config.json").write_text("[1, 2]")
    out["no_weights"] = copy("no_weights")
    (out["no_weights"] / "model.safetensors").unlink()
    out["corrupt"] = copy("corrupt")
    data = (lang / "model.safetensors").read_bytes()
    (out["corrupt"] / "model.safetensors").write_bytes(data[: len(data) // 3])
    out["bad_header"] = copy("bad_header")
    (out["bad_header"] / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json}......")
    out["custom"] = copy("custom")
    cfg = json.loads((lang / "config.json").read_text())
    cfg.update(model_type="zoollama", auto_map={"AutoModelForCausalLM": "modeling_z.ZForCausalLM"})
    (out["custom"] / "config.json").write_text(json.dumps(cfg))
    out["layers"] = copy("layers")
    cfg = json.loads((lang / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (out["layers"] / "config.json").write_text(json.dumps(cfg))
    out["nan"] = root / "nan"
    edit_weights(lang, out["nan"], lambda sd: sd[UP0].view(-1)[:2].fill_(float("nan")))
    out["pickled"] = copy("pickled")
    torch.save(load_file(lang / "model.safetensors"), out["pickled"] / "pytorch_model.bin")
    (out["pickled"] / "model.safetensors").unlink()
    return out


CASES = {
    "missing": "no such folder",
    "no_config": "no config.json",
    "bad_config": "config.json: not valid JSON",
    "list_config": "config.json: not a JSON object",
    "no_weights": "no *.safetensors weights",
    "corrupt": "corrupt safetensors",
    "bad_header": "corrupt safetensors header",
    "custom": "auto_map",
    "layers": "config says",
    "pickled": "--allow-pickle",
    "nan": f"{UP0} has 2 NaN values; a model with NaN or inf weights cannot be scored",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_zoo_eval_bad_model(zoo, broken, capsys, case):
    argv = ["zoo", "eval", broken[case], "--zoo", zoo, "--tasks", "zoo_lang", "--no-progress"]
    fails(capsys, argv, CASES[case], watch=(zoo / "tasks", broken[case].parent))


def test_zoo_eval_bad_options_and_zoo(zoo, models, tmp_path, capsys):
    lang = zoo / "lang"
    for limit in ("0", "-5", "x"):
        argv = ["zoo", "eval", lang, "--zoo", zoo, "--limit", limit]
        fails(capsys, argv, "--limit", usage=True, watch=(zoo / "tasks",))
    # a model of another vocabulary would index past its embedding inside lm-eval
    fails(capsys, ["zoo", "eval", models["clean"], "--zoo", zoo], "96 token embeddings")
    fails(capsys, ["zoo", "eval", lang, "--zoo", tmp_path / "nozoo"], "not a built zoo")
    fake = tmp_path / "fake"
    shutil.copytree(zoo / "tasks", fake / "tasks")
    with (fake / "tasks" / "zoo_lang.jsonl").open("a") as f:
        f.write("{truncated\n")
    fails(capsys, ["zoo", "eval", lang, "--zoo", fake], "zoo_lang.jsonl:", "not a zoo task item")
    (fake / "tasks" / "zoo_math.jsonl").unlink()
    fails(capsys, ["zoo", "eval", lang, "--zoo", fake], "zoo_math.jsonl: missing")


def test_zoo_eval_api_checks(zoo, broken, monkeypatch):
    from transformers import AutoModelForCausalLM

    from splice.zoo import evaluate, load_model  # README's zoo loader (a thin wrapper)

    with pytest.raises(SpliceError, match="limit must be"):
        evaluate([zoo / "lang"], "zoo_lang", zoo=zoo, limit=0)
    with pytest.raises(SpliceError, match="--allow-pickle"):
        load_model(broken["pickled"])
    calls: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(zoo / "lang")
    assert calls[-1]["use_safetensors"] is True and calls[-1]["trust_remote_code"] is False
    load_model(broken["pickled"], allow_pickle=True)
    assert calls[-1]["use_safetensors"] is None and calls[-1]["weights_only"] is True


def test_zoo_eval_allow_pickle_scores_and_writes_nothing(zoo, broken, capsys):
    before = snapshot(zoo)
    argv = ["zoo", "eval", broken["pickled"], "--zoo", zoo, "--tasks", "zoo_lang"]
    assert run([*argv, "--limit", "8", "--json", "--no-progress", "--allow-pickle"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0.0 <= scores[str(broken["pickled"])]["zoo_lang"] <= 1.0
    assert snapshot(zoo) == before  # the zoo's task configs are not rewritten
