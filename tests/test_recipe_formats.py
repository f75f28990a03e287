"""mergekit's other recipe formats: mergekit-moe's file (``experts``, no ``merge_method``) and
mergekit-multi's multi-document files (``---``-separated recipes with ``name`` s that later
documents merge), run through ``splice merge`` and compared with the one-document equivalents
and with ``mergekit-multi`` itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import splice.merge as sm
from splice.cli import main
from splice.errors import SpliceError
from splice.merge.multi import MultiRecipe, read_recipe
from splice.merge.recipe import Recipe

MERGEKIT_MULTI = Path(sys.executable).with_name("mergekit-multi")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def write(path: Path, *docs: dict) -> Path:
    path.write_text("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    return path


# ---- mergekit-moe -------------------------------------------------------------------------------
def moe_recipe(trio) -> dict:
    """As mergekit-moe's README writes one: no merge_method."""
    return {
        "base_model": str(trio["base"]),
        "gate_mode": "hidden",
        "dtype": "bfloat16",
        "experts": [
            {"source_model": str(trio["ft1"]), "positive_prompts": ["w1 w2 w3", "w4 w5"]},
            {
                "source_model": str(trio["ft2"]),
                "positive_prompts": ["w40 w41 w42"],
                "negative_prompts": ["w7 w8 w9"],
            },
        ],
    }


def test_mergekit_moe_file_is_merge_method_moe(trio):
    r = Recipe.from_dict(moe_recipe(trio))
    assert r.merge_method == "moe" and len(r.experts) == 2 and r.experts_per_token == 2
    assert Recipe.from_dict({**moe_recipe(trio), "shared_experts": None}) == r


def test_mergekit_moe_file_runs_like_merge_method_moe(trio, tmp_path, capsys):
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(moe_recipe(trio)))
    assert main(["merge", str(path), str(tmp_path / "a"), "--no-progress"]) == 0
    explicit = write(tmp_path / "explicit.yml", {"merge_method": "moe", **moe_recipe(trio)})
    assert main(["merge", str(explicit), str(tmp_path / "b"), "--no-progress"]) == 0
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    same(a, b)  # routers too: the same computation
    assert sum(k.endswith("block_sparse_moe.gate.weight") for k in a) == 4
    assert all(t.dtype == torch.bfloat16 for t in a.values())
    config = (tmp_path / "a" / "config.json").read_text()
    assert config == (tmp_path / "b" / "config.json").read_text()
    assert '"num_local_experts": 2' in config


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"shared_experts": [{"source_model": "x/y"}]}, "x/y: not a local folder"),
        ({"base_model": None}, "merge_method moe needs a `base_model`"),
        ({"experts": []}, "merge_method moe needs an `experts` list"),
        ({"gate_mode": "hiddden"}, "moe: unknown gate_mode 'hiddden'"),
    ],
)
def test_mergekit_moe_file_problems_are_one_line(trio, tmp_path, capsys, change, problem):
    recipe = {k: v for k, v in {**moe_recipe(trio), **change}.items() if v is not None}
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert problem in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# ---- mergekit-multi -----------------------------------------------------------------------------
def multi_docs(trio) -> list[dict]:
    """mergekit's docs/multimerge.md example on the trio: linear -> slerp -> task arithmetic,
    the final document unnamed and listed first (run order is dependency order)."""
    b, f1, f2 = (str(trio[k]) for k in ("base", "ft1", "ft2"))
    return [
        {
            "merge_method": "task_arithmetic",
            "base_model": b,
            "models": [
                {"model": "second-merge", "parameters": {"weight": 0.7}},
                {"model": f1, "parameters": {"weight": 0.4}},
            ],
            "dtype": "float32",
        },
        {
            "name": "first-merge",
            "merge_method": "linear",
            "models": [{"model": f1}, {"model": f2}],
            "parameters": {"weight": 0.5},
            "dtype": "float32",
        },
        {
            "name": "second-merge",
            "merge_method": "slerp",
            "base_model": "first-merge",
            "models": [{"model": "first-merge"}, {"model": b}],
            "parameters": {"t": 0.3},
            "dtype": "float32",
        },
    ]


def by_hand(trio, tmp_path: Path) -> dict[str, Path]:
    """The documents run one by one with splice, names replaced by the folders by hand."""
    final, first, second = multi_docs(trio)
    first = {k: v for k, v in first.items() if k != "name"}
    sm.run(first, tmp_path / "h1", sm.MergeOptions(show_progress=False))
    h1 = str(tmp_path / "h1")
    second = {
        **{k: v for k, v in second.items() if k != "name"},
        "base_model": h1,
        "models": [{"model": h1}, {"model": str(trio["base"])}],
    }
    sm.run(second, tmp_path / "h2", sm.MergeOptions(show_progress=False))
    final["models"][0]["model"] = str(tmp_path / "h2")
    sm.run(final, tmp_path / "h3", sm.MergeOptions(show_progress=False))
    return {"first-merge": tmp_path / "h1", "second-merge": tmp_path / "h2", None: tmp_path / "h3"}


def test_multi_documents_load_in_dependency_order(trio, tmp_path):
    multi = read_recipe(write(tmp_path / "m.yml", *multi_docs(trio)))
    assert isinstance(multi, MultiRecipe)
    assert [s.name for s in multi.stages] == ["first-merge", "second-merge", None]
    assert [s.index for s in multi.stages] == [2, 3, 1]
    assert multi.stages[1].uses == ("first-merge",) and multi.final.uses == ("second-merge",)
    assert multi.external_models() == [str(trio["base"]), str(trio["ft1"]), str(trio["ft2"])]
    resolved = multi.resolved(multi.stages[1], {"first-merge": "x/first"})
    assert resolved.base_model == os.path.abspath("x/first")
    with pytest.raises(SpliceError, match="holds 3 YAML documents"):
        Recipe.from_yaml(tmp_path / "m.yml")
    # all documents named: the one nothing uses is the final merge (mergekit's docs' 2nd form)
    docs = multi_docs(trio)
    docs[0]["name"] = "third-merge"
    multi = read_recipe(write(tmp_path / "named.yml", *docs))
    assert multi.final.name == "third-merge"


def test_multi_documents_match_one_by_one(trio, tmp_path, capsys):
    path = write(tmp_path / "m.yml", *multi_docs(trio))
    out = tmp_path / "out" / "final"
    assert main(["merge", str(path), str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    hand = by_hand(trio, tmp_path)
    same(tensors(out), tensors(hand[None]))
    assert sorted(p.name for p in out.parent.iterdir()) == ["final"]  # temporary folder gone
    assert "second-merge" in (out / "README.md").read_text()  # the card holds every document
    base = tensors(trio["base"])
    assert any(not torch.equal(v, base[k]) for k, v in tensors(out).items())


def test_multi_keep_intermediates(trio, tmp_path, capsys):
    path = write(tmp_path / "m.yml", *multi_docs(trio))
    keep = tmp_path / "inter"
    args = ["merge", str(path), str(tmp_path / "final"), "--keep-intermediates", str(keep)]
    assert main([*args, "--no-progress"]) == 0
    hand = by_hand(trio, tmp_path)
    assert sorted(p.name for p in keep.iterdir()) == ["first-merge", "second-merge"]
    for name in ("first-merge", "second-merge"):
        same(tensors(keep / name), tensors(hand[name]))
    same(tensors(tmp_path / "final"), tensors(hand[None]))
    # a second run: the outputs exist, so it is refused before anything runs ...
    assert main([*args, "--no-progress"]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    # ... or replaces them all with --overwrite
    assert main([*args, "--no-progress", "--overwrite"]) == 0
    same(tensors(keep / "second-merge"), tensors(hand["second-merge"]))


@pytest.mark.skipif(not MERGEKIT_MULTI.exists(), reason="mergekit is not installed")
def test_multi_matches_mergekit_multi(trio, tmp_path):
    """The same file through mergekit-multi: every intermediate and the final merge equal to
    float32 rounding (the parity tests' tolerance)."""
    path = write(tmp_path / "m.yml", *multi_docs(trio))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(MERGEKIT_MULTI), str(path), "--intermediate-dir", str(tmp_path / "mk-inter")]
    cmd += ["--out-path", str(tmp_path / "mk"), "--no-copy-tokenizer", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sm.run(
        path,
        tmp_path / "sp",
        sm.MergeOptions(show_progress=False),
        keep_intermediates=tmp_path / "sp-inter",
    )
    pairs = [(tmp_path / "sp", tmp_path / "mk")] + [
        (tmp_path / "sp-inter" / n, tmp_path / "mk-inter" / n)
        for n in ("first-merge", "second-merge")
    ]
    for ours_dir, theirs_dir in pairs:
        ours, theirs = tensors(ours_dir), tensors(theirs_dir)
        assert sorted(ours) == sorted(theirs)
        worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in theirs)
        assert worst <= 1e-6, f"{ours_dir.name}: max abs diff {worst:.3g}"


def test_multi_dry_run(trio, tmp_path, capsys):
    path = write(tmp_path / "m.yml", *multi_docs(trio))
    assert main(["merge", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 documents (mergekit-multi), in run order:")
    assert "document 2 (first-merge) -> a temporary folder beside OUT" in out
    assert "linear(" in out  # the first document's plan
    assert "document 1 (final, unnamed) -> OUT" in out
    assert "uses second-merge: planned when it runs" in out
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def bad_multi(trio) -> dict[str, tuple[list, str]]:
    final, first, second = multi_docs(trio)

    def named(doc: dict, name) -> dict:
        return {**doc, "name": name}

    return {
        "two unnamed": ([final, {**first, "name": None}, second], "only the final merge"),
        "duplicate name": ([final, first, named(second, "first-merge")], "given to two"),
        "cycle": (
            [final, {**first, "models": [{"model": "second-merge"}]}, second],
            "in a cycle (first-merge -> second-merge -> first-merge)",
        ),
        "self": (
            [
                {**final, "models": [{"model": "x", "parameters": {"weight": 1.0}}]},
                {**first, "name": "x", "models": [{"model": "x"}, {"model": str(trio["ft1"])}]},
            ],
            "in a cycle (x -> x)",
        ),
        "unused": (
            [final, first, second, named(first, "spare")],
            "document 4 (spare) is not used by the final merge",
        ),
        "two finals": (
            [named(final, "a"), first, second, named(first, "b")],
            "documents a, b are each used by no other document",
        ),
        "bad name": ([final, named(first, "../up"), second], "name '../up' must be"),
        "reserved name": ([final, named(first, "union"), second], "name 'union' must be"),
        "not a mapping": ([final, first, second, [1, 2]], "document 4 is not a mapping"),
        "schema": (
            [final, {**first, "modles": []}, second],
            "document 2 (first-merge): modles: unknown key",
        ),
        "later method": (  # found before the first merge runs
            [{**final, "merge_method": "tie"}, first, second],
            "document 1 (final, unnamed): unknown merge method 'tie'",
        ),
        "later model": (
            [{**final, "base_model": "/no/such/model"}, first, second],
            "document 1 (final, unnamed): ",
        ),
    }


BAD_CASES = [
    "two unnamed", "duplicate name", "cycle", "self", "unused", "two finals", "bad name",
    "reserved name", "not a mapping", "schema", "later method", "later model",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_multi_documents_are_refused_before_anything_runs(trio, tmp_path, capsys, case):
    docs, problem = bad_multi(trio)[case]
    path = tmp_path / "m.yml"
    path.write_text("---\n".join(yaml.safe_dump(d) for d in docs))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert problem in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yml"]  # nothing written


def test_a_failing_stage_names_its_document_and_leaves_nothing(trio, tmp_path, capsys):
    """A problem only planning can find, in a document that reads an intermediate merge, is
    found when it runs: the error names the document, OUT is not made and the temporary
    intermediates are removed."""
    final, first, second = multi_docs(trio)
    second = {**second, "parameters": {}}  # slerp without t
    path = write(tmp_path / "m.yml", final, first, second)
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("splice: error: document 3 (second-merge): slerp: parameter 't' is")
    assert len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yml"]


def test_keep_intermediates_needs_a_multi_document_recipe(trio, tmp_path, capsys):
    path = write(tmp_path / "one.yml", {**multi_docs(trio)[1], "name": None})
    args = ["merge", str(path), str(tmp_path / "out"), "--keep-intermediates", "x"]
    assert main(args) == 2
    assert "no intermediate merges are made" in capsys.readouterr().err


def test_names_win_over_folders_and_paths_resolve_beside_the_recipe(trio, tmp_path):
    """A name means that document's output even where a folder of that name exists (as in
    mergekit-multi); other relative paths resolve against the recipe's folder."""
    import shutil

    root = tmp_path / "recipes"
    root.mkdir()
    shutil.copytree(trio["ft2"], root / "first-merge")  # a decoy folder named like a document
    shutil.copytree(trio["ft1"], root / "ft1")
    docs = multi_docs(trio)
    docs[1]["models"][0]["model"] = "ft1"  # relative to the recipe file
    path = write(root / "m.yml", *docs)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        sm.run(Path("recipes/m.yml"), tmp_path / "out", sm.MergeOptions(show_progress=False))
    finally:
        os.chdir(cwd)
    same(tensors(tmp_path / "out"), tensors(by_hand(trio, tmp_path / "hand")[None]))
    assert path.exists()
