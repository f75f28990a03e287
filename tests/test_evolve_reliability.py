"""``splice evolve`` as a careless or hostile user meets it: no code runs from a run folder, a
malformed state is one line, a full or read-only disk leaves nothing behind, nonsense sizes are
refused before any work, an unreachable Ray head is one line.

One test per class of fault; each asserts exit code 2, one line on stderr, and what is (not)
left on disk.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import held_lock
from evolve_helpers import config_dict, write_config, write_tasks

from splice.cli import main
from splice.errors import SpliceError

pytest.importorskip("cma")
pytest.importorskip("lm_eval")

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("evolve_rel_tasks"))


@pytest.fixture(scope="module")
def finished(trio, tasks, tmp_path_factory) -> Path:
    """A finished run of 3 generations (4 candidates each) and its config file."""
    root = tmp_path_factory.mktemp("evolve_rel")
    cfg = write_config(root / "search.yml", config_dict(trio, tasks, generations=3))
    assert main(["evolve", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def one_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(("splice: error: ", "splice evolve: error: ")), err
    return err[0]


def copy_run(finished: Path, dst: Path) -> Path:
    shutil.copytree(finished, dst)
    return dst


def unfinished(state: dict, generations: int = 2) -> dict:
    """``state`` cut back to its first ``generations`` generations, as a kill leaves it."""
    state["records"] = [r for r in state["records"] if r["generation"] < generations]
    state["history"] = state["history"][:generations]
    state["generation"], state["stop"] = generations, None
    return state


# ---- 1. no code runs from a run folder ---------------------------------------------------------
class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(run: Path, marker: Path) -> None:
    """An older splice's run folder, its state.pkl a hostile pickle."""
    (run / "state.json").unlink()
    (run / "state.pkl").write_bytes(pickle.dumps({"stop": _Payload(marker)}))


def test_a_planted_pickle_never_runs(finished, trio, tasks, tmp_path, capsys):
    """Every way splice reads a run folder: resume, report, a new run into it, and the run
    named as a source model of another search (PS + DFS)."""
    run = copy_run(finished, tmp_path / "run")
    marker = tmp_path / "pwned"
    plant_pickle(run, marker)
    cfg = write_config(tmp_path / "again.yml", config_dict(trio, tasks, generations=3))
    dfs = config_dict(trio, tasks, generations=2)
    dfs["genome"] = {"models": [str(run), str(trio["ft2"])], "space": "dataflow", "repeats": 1}
    dfs_cfg = write_config(tmp_path / "dfs.yml", dfs)
    for argv in (
        ["evolve", "resume", str(run)],
        ["evolve", "report", str(run)],
        ["evolve", "report", str(run), "--table"],
        ["evolve", str(cfg), "--out", str(run)],
        ["evolve", str(dfs_cfg), "--out", str(tmp_path / "dfs_run")],
    ):
        line = one_error(capsys, argv)
        assert "state.pkl" in line and "--allow-pickle" in line, line
        assert not marker.exists(), argv
    assert not (tmp_path / "dfs_run").exists() and not (run / "winner").exists()
    # with --allow-pickle the user said they trust it: then it is read (and runs)
    assert main(["evolve", "report", str(run), "--allow-pickle"]) == 2
    assert marker.exists()


def test_an_older_splice_state_pkl_is_read_with_allow_pickle(finished, tmp_path, capsys):
    """A run folder as an older splice wrote it (the state pickled, with its strategy object):
    refused without --allow-pickle; with it, the report is the same and a resume converts
    the folder to state.json."""
    import cma

    run = copy_run(finished, tmp_path / "old")
    full = json.loads((run / "state.json").read_text())
    state = unfinished(json.loads((run / "state.json").read_text()))
    state.pop("format"), state.pop("version")
    state["es"] = cma.CMAEvolutionStrategy([0.5, 0.5], 0.2, {"verbose": -9})
    (run / "state.json").unlink()
    (run / "state.pkl").write_bytes(pickle.dumps(state))
    assert "--allow-pickle" in one_error(capsys, ["evolve", "report", str(run)])
    capsys.readouterr()
    assert main(["evolve", "report", str(run), "--allow-pickle"]) == 0
    out = capsys.readouterr().out
    assert "generation 2/3, 8 candidates" in out and "unfinished" in out
    assert main(["evolve", "resume", str(run), "--allow-pickle", "--no-progress"]) == 0

    def run_of(state):
        return [(r["genes"], r["scores"], r["fitness"]) for r in state["records"]]

    assert run_of(json.loads((run / "state.json").read_text())) == run_of(full)


# ---- 2. a malformed state is one line ---------------------------------------------------------
def _edit(key: str, value):
    def f(state: dict) -> dict:
        state[key] = value
        return state

    return f


def _first_record(key: str, value):
    def f(state: dict) -> dict:
        state["records"][0][key] = value
        return state

    return f


def _gene(state: dict) -> dict:
    state["records"][5]["genes"][0] += 1e-9  # edited: the replay proposes other genes
    return state


MALFORMED = {
    "a list": (lambda s: [s], "a list, not a mapping"),
    "a string": (lambda s: "hello", "a str, not a mapping"),
    "no format": (lambda s: {k: v for k, v in s.items() if k != "format"}, "format"),
    "a future version": (_edit("version", 99), "version 99"),
    "records not a list": (_edit("records", {"a": 1}), "records"),
    "genes as strings": (_first_record("genes", ["x"]), "records.0.genes.0"),
    "a negative generation": (_edit("generation", -1), "generation"),
    "history shorter than generations": (_edit("history", []), "history"),
    "an unknown key": (_edit("pickle", "x"), "pickle"),
    "edited genes": (_gene, "generation 1's candidates are not the ones"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_state_is_one_line(finished, tmp_path, capsys, case):
    edit, expected = MALFORMED[case]
    run = copy_run(finished, tmp_path / "run")
    state = unfinished(json.loads((run / "state.json").read_text()))  # resume replays it
    (run / "state.json").write_text(json.dumps(edit(state)))
    before = sorted(p.name for p in run.iterdir())
    for argv in (["evolve", "resume", str(run)], ["evolve", "report", str(run)]):
        if case == "edited genes" and argv[1] == "report":
            continue  # report reads the data; only a replay can tell the genes were edited
        assert expected in one_error(capsys, argv)
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("content", [b"", b"{", b"\x80\x04K\x01.", b"[" * 100000, b"NaN"])
def test_unreadable_state_bytes_are_one_line(finished, tmp_path, capsys, content):
    run = copy_run(finished, tmp_path / "run")
    (run / "state.json").write_bytes(content)
    assert "state.json" in one_error(capsys, ["evolve", "report", str(run)])


# ---- 3. unwritable targets ------------------------------------------------------------------
@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only file system (EROFS: a tmpfs mounted ro, as root), or one
    without write permission (EACCES) for other users."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_folder_is_one_line(trio, tasks, tmp_path, capsys, read_only_folder):
    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks, generations=1))
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(read_only_folder / "run")])
    assert "run" in line and ("Read-only" in line or "Permission" in line), line
    assert list(read_only_folder.iterdir()) == []


def test_a_full_disk_leaves_nothing_and_the_run_resumes(trio, tasks, tmp_path, capsys, monkeypatch):
    """A new run on a full disk leaves no folder; a disk that fills mid-run leaves the last
    finished generation's state, no temporary file, and the run resumes to the uninterrupted
    result."""
    import errno

    from splice.evolve import evolve, resume

    full = {"on": True}
    real = os.fsync

    def fsync(fd):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks, generations=3))
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(tmp_path / "run")])
    assert "no space left" in line.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]

    full["on"] = False

    def fill_after_generation_0(h):
        full["on"] = True

    run = tmp_path / "run"
    with pytest.raises(SpliceError) as e:
        evolve(cfg, run, on_generation=fill_after_generation_0)
    assert len(str(e.value).splitlines()) == 1 and "state.json" in str(e.value)
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    assert json.loads((run / "state.json").read_text())["generation"] == 1
    full["on"] = False
    resumed = resume(run)
    reference = evolve(cfg, tmp_path / "ref")
    assert resumed.best_genes == reference.best_genes
    mine = json.loads((run / "state.json").read_text())["records"]
    theirs = json.loads((reference.run / "state.json").read_text())["records"]
    assert [r["genes"] for r in mine] == [r["genes"] for r in theirs]


def test_a_killed_runs_leftovers_are_cleaned(finished, trio, tasks, tmp_path):
    """SIGKILL leaves ``.state.json.tmp-PID`` in a run folder and a staging folder beside a new
    one; the next run removes those of processes that are gone, and nothing else."""
    run = copy_run(finished, tmp_path / "run")
    state = unfinished(json.loads((run / "state.json").read_text()))
    (run / "state.json").write_text(json.dumps(state))
    dead = 2**22 + 12345  # above pid_max's default: no such process
    (run / f".state.json.tmp-{dead}").write_text("{")
    (run / "notes.txt").write_text("mine")
    assert main(["evolve", "resume", str(run), "--no-progress"]) == 0
    assert not (run / f".state.json.tmp-{dead}").exists() and (run / "notes.txt").exists()

    stale = tmp_path / f".new.evolve-tmp-{dead}-abc"
    stale.mkdir()
    (stale / "config.yml").write_text("x")
    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks, generations=1))
    assert main(["evolve", str(cfg), "--out", str(tmp_path / "new"), "--no-progress"]) == 0
    assert not stale.exists()


# ---- 4. numeric nonsense and sizes --------------------------------------------------------------
def _search(**kw):
    return lambda d: d["search"].update(kw)


def _dataflow(repeats: int):
    def f(d):
        d["genome"] = {"models": d["genome"]["models"], "space": "dataflow", "repeats": repeats}

    return f


NONSENSE = {
    "popsize 1000000": (_search(popsize=1_000_000), "search.popsize"),
    "sigma0 nan": (_search(sigma0=float("nan")), "search.sigma0"),
    "sigma0 negative": (_search(sigma0=-1), "search.sigma0"),
    "generations 1e12": (_search(generations=10**12), "search.generations"),
    "budget over the limit": (_search(popsize=5000, generations=1000), "5,000,000 candidates"),
    "repeats 1000000": (_dataflow(1_000_000), "genome.repeats"),
    "batch size 1e9": (lambda d: d["lm_eval"].update(batch_size=10**9), "lm_eval.batch_size"),
    "seed -1": (_search(seed=-1), "search.seed"),
}


@pytest.mark.parametrize("case", list(NONSENSE))
def test_nonsense_sizes_are_refused_before_any_work(trio, tasks, tmp_path, capsys, case):
    edit, expected = NONSENSE[case]
    data = config_dict(trio, tasks)
    edit(data)
    cfg = write_config(tmp_path / "c.yml", data)
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(tmp_path / "run")])
    assert expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]


def test_repeats_over_the_gene_limit_name_the_limit(trio, tasks, tmp_path, capsys, monkeypatch):
    from splice.evolve import genome

    monkeypatch.setattr(genome, "MAX_GENES", 100)
    data = config_dict(trio, tasks)
    _dataflow(20)(data)
    cfg = write_config(tmp_path / "c.yml", data)
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(tmp_path / "run")])
    assert "320 genes (20 repeats of 8 layers, two genes each)" in line and "(100:" in line


@pytest.mark.parametrize("value", ["0", "-3", "x", "1e3"])
def test_bad_workers_are_one_line(finished, capsys, value):
    one_error(capsys, ["evolve", "resume", str(finished), "--workers", value])


def test_a_source_with_nan_weights_is_refused(trio, tasks, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(trio["ft2"], bad)
    sd = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    sd[name][0, :3] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    data = config_dict(trio, tasks)
    data["genome"]["models"][1] = str(bad)
    cfg = write_config(tmp_path / "c.yml", data)
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(tmp_path / "run")])
    assert f"{name} has 3 NaN values" in line
    assert not (tmp_path / "run").exists()


# ---- 5. unreachable services -------------------------------------------------------------------
@pytest.mark.parametrize(
    "address, expected",
    [
        ("not-an-address", "give auto, local or HOST:PORT"),
        ("127.0.0.1:99999", "give auto, local or HOST:PORT"),
        ("127.0.0.1:1", "cannot reach the Ray head"),
        ("ray://127.0.0.1:1", "cannot reach the Ray head"),
    ],
)
def test_an_unreachable_ray_head_is_one_line(trio, tasks, tmp_path, capsys, address, expected):
    cfg = write_config(tmp_path / "c.yml", config_dict(trio, tasks, generations=1))
    line = one_error(capsys, ["evolve", str(cfg), "--out", str(tmp_path / "run"), "--ray", address])
    assert expected in line
    assert not (tmp_path / "run").exists()


def test_a_silent_ray_head_times_out(monkeypatch):
    """A head that never answers (the SYN dropped): a connect time-out, not Ray's retries."""
    import socket

    from splice.evolve import executors

    def silent(*args, timeout=None, **kwargs):
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(SpliceError, match=r"cannot reach the Ray head \(timed out after at most"):
        executors.check_ray_address("127.0.0.1:6379", reach=True)


def test_a_huge_popsize_exits_at_once(trio, tasks, tmp_path):
    """The real process: `popsize: 1000000` exits 2 at once (it ran until killed)."""
    data = config_dict(trio, tasks)
    data["search"]["popsize"] = 1_000_000
    cfg = write_config(tmp_path / "c.yml", data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "splice.cli", "evolve", str(cfg), "--out", str(tmp_path / "r")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.decode().strip().splitlines()) == 1


# ---- 6. the schemas, fuzzed -------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
_KEYS = {
    "": ["genome", "tasks", "lm_eval", "search", "dtype", "device", "sources", "limit"],
    "genome": [
        "models",
        "merge_method",
        "base_model",
        "layer_granularity",
        "space",
        "repeats",
        "scales",
        "donor",
        "prune",
    ],
    "search": [
        "popsize",
        "sigma0",
        "seed",
        "generations",
        "max_fevals",
        "start",
        "grid",
        "restarts",
        "patience",
        "max_restarts",
        "fitness",
        "subset",
        "race_z",
        "size_weight",
    ],
    "lm_eval": ["batch_size", "limit", "num_fewshot", "max_length"],
}


@st.composite
def configs(draw):
    """Documents shaped like evolve configs: the schema's keys with random values."""
    doc = {}
    for key in draw(st.lists(st.sampled_from(_KEYS[""]), max_size=6, unique=True)):
        if key in _KEYS:
            sub = draw(st.lists(st.sampled_from(_KEYS[key]), max_size=5, unique=True))
            doc[key] = {k: draw(_json) for k in sub} if draw(st.booleans()) else draw(_json)
        elif key == "tasks":
            doc[key] = draw(st.one_of(_json, st.lists(st.text(min_size=1, max_size=8))))
        else:
            doc[key] = draw(_json)
    return doc


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(configs())
def test_random_config_documents_are_accepted_or_one_line_per_problem(doc):
    from splice.evolve.config import EvolveConfig

    try:
        EvolveConfig.from_dict(doc)
    except SpliceError as e:
        lines = str(e).splitlines()
        assert lines and all(line.startswith("config") for line in lines), str(e)


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(
    st.fixed_dictionaries(
        {
            "format": st.sampled_from(["splice-evolve-state", "x"]),
            "version": st.sampled_from([1, 2, "1"]),
        },
        optional={
            k: _json
            for k in ("fingerprint", "config", "generation", "generations", "records", "history")
        }
        | {"stop": st.one_of(st.none(), st.text(max_size=5))},
    )
)
def test_random_state_documents_are_accepted_or_one_line(doc):
    from splice.evolve.state import validate

    try:
        validate(doc, "state.json")
    except SpliceError as e:
        assert len(str(e).splitlines()) == 1


@pytest.mark.parametrize("content", ["merge_method: [", "- a list\n", "\x00\x01", ""])
def test_a_malformed_best_yml_is_one_line(finished, tmp_path, capsys, content):
    run = copy_run(finished, tmp_path / "run")
    (run / "best.yml").write_text(content)
    argv = ["evolve", "report", str(run), "--table", "--tasks", "tiny_mc"]
    assert "best.yml" in one_error(capsys, argv)
    assert capsys.readouterr().out == ""  # not the report without its table


@pytest.mark.parametrize("content", ["{", "[1, 2]\n", '"text"\n', "{}\n{"])
def test_malformed_candidates_are_one_line(finished, tmp_path, content):
    from splice.evolve.report import read_candidates

    run = copy_run(finished, tmp_path / "run")
    (run / "candidates.jsonl").write_text(content)
    with pytest.raises(SpliceError, match=r"candidates.jsonl: line \d+ is not a candidate"):
        read_candidates(run)
    assert len(read_candidates(finished)) == 12


def test_a_run_folder_being_written_is_refused(finished, tmp_path, capsys):
    """One writer per run folder: a resume while another process holds it is one line."""
    run = copy_run(finished, tmp_path / "run")
    state = unfinished(json.loads((run / "state.json").read_text()))
    (run / "state.json").write_text(json.dumps(state))
    with held_lock(run):
        line = one_error(capsys, ["evolve", "resume", str(run)])
        assert "another splice run is writing it" in line
    assert json.loads((run / "state.json").read_text()) == state
