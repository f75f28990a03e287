"""Shared fixtures: tiny checkpoints of every supported architecture, saved by transformers.

Checkpoints are written by ``transformers``' own ``save_pretrained`` (an independent writer), some
in several shards, so splice's reader and writer are always checked against the reference.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: test-only dependencies (pyproject's dev extra): a test that skips for want of one passes
#: vacuously, so under CI=true such a skip is a failure
# importorskip reasons name the module quoted: "'ray'" (a bare "ray" would match "array")
REQUIRED_IN_CI = ("mergekit", "lm_eval", "lm-eval", "hypothesis", "cma", "peft", "'ray'")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        if any(dep in reason for dep in REQUIRED_IN_CI):
            report.outcome = "failed"
            report.longrepr = f"CI=true: a required test dependency is missing ({reason})"


#: what ``make test-fast`` (``pytest --fast``) leaves out: tests marked ``slow`` and these
#: node-id prefixes, which run mergekit itself (the golden tensors of test_merge_golden.py stand
#: in for it), build or score the zoo, start processes or Ray, or fuzz at length
FAST_LEAVES_OUT = (
    "tests/test_merge_vs_mergekit.py",
    "tests/test_methods.py::test_parity_with_mergekit",
    "tests/test_sce_bf16.py",
    "tests/test_recipe_formats.py::test_multi_matches_mergekit",
    "tests/test_zoo.py",
    "tests/test_zoo_merges.py",
    "tests/test_analysis_notebook.py",
    "tests/test_scoring.py::test_evaluate_tasks_take_the_zoo_eval_path",
    "tests/test_analysis_activations.py::test_lm_eval_task_calibration",
    "tests/test_evolve_search.py::test_ray_actors",
    "tests/test_evolve_search.py::test_resume_after_sigterm",
    "tests/test_evolve_search.py::test_two_worker_processes",
    "tests/test_evolve_reliability.py::test_a_full_disk",
    "tests/test_fuzz_headers.py::test_mutated_headers_raise_only_splice_errors",
    "tests/test_surgery_slice.py::test_shared_output_is_a_stock_checkpoint",
    # the architecture batteries: every verb on 36 families, 45 types (README's table)
    "tests/test_families.py",
    "tests/test_never_broken.py",
    "tests/test_arch_table.py",
)


def pytest_addoption(parser):
    parser.addoption(
        "--fast",
        action="store_true",
        help="leave out the slow tests (conftest.FAST_LEAVES_OUT and @pytest.mark.slow)",
    )


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--fast"):
        return
    keep, drop = [], []
    for item in items:
        slow = item.get_closest_marker("slow") or item.nodeid.startswith(FAST_LEAVES_OUT)
        (drop if slow else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi3", "mixtral"]

# extra config per model type, on top of the common tiny shape
EXTRA: dict[str, dict] = {
    "llama": {"tie_word_embeddings": False},
    "mistral": {},
    "qwen2": {},
    "gemma": {"head_dim": 8},
    "phi3": {"pad_token_id": 0},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def make_tiny(
    path: Path,
    model_type: str = "llama",
    *,
    layers: int = 4,
    hidden: int = 32,
    vocab: int = 96,
    max_shard_size: str | None = None,
    seed: int = 0,
    **overrides,
) -> Path:
    """Save a randomly initialised tiny model of ``model_type`` with transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden + 8,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **EXTRA[model_type],
        **overrides,
    }
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms start at exactly 1 (or 0): perturb so they carry information
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kw)
    make_tokenizer(vocab).save_pretrained(path)
    return path


@contextlib.contextmanager
def held_lock(target: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``splice.target.lock_target(target)`` while the block runs."""
    code = (
        "import time\n"
        "from splice.target import lock_target\n"
        f"with lock_target({str(target)!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)


def make_tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` made-up words (w0, w1, ...) with special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per architecture; llama and mixtral are sharded."""
    root = tmp_path_factory.mktemp("tiny")
    shards = {"llama": "20KB", "mixtral": "40KB"}
    return {
        mt: make_tiny(root / mt, mt, max_shard_size=shards.get(mt), seed=i)
        for i, mt in enumerate(ARCHS)
    }


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def zoo() -> Path:
    """The shared, full-size zoo: committed in assets/zoo (or built here once, ~10 minutes)."""
    from splice.zoo import build, default_dir

    return build(default_dir(), show_progress=False)


@pytest.fixture(scope="session")
def analysis_zoo(zoo, tmp_path_factory) -> Path:
    """The zoo's models (linked) plus ``corpus.txt``, calibration text from its distribution."""
    from splice.zoo import calibration_text

    root = tmp_path_factory.mktemp("analysis_zoo")
    for name in ("base", "math", "lang", "moe"):
        (root / name).symlink_to(zoo / name, target_is_directory=True)
    (root / "corpus.txt").write_text(calibration_text())
    return root


@pytest.fixture(scope="session")
def trio(tmp_path_factory):
    """A base and two 'fine-tunes' (base + small deltas), tiny llama, float32."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("trio")
    base = make_tiny(root / "base", "llama", seed=0)
    out = {"base": base}
    for i, name in enumerate(["ft1", "ft2"], start=1):
        dst = root / name
        shutil.copytree(base, dst)
        sd = load_file(dst / "model.safetensors")
        g = torch.Generator().manual_seed(i)
        save_file(
            {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()},
            dst / "model.safetensors",
            metadata={"format": "pt"},
        )
        out[name] = dst
    return out


def logits(folder_or_model, ids=None, **config):
    """Logits of a model (or a folder, loaded in float32) on a fixed id sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32, **config)
    ids = ids if ids is not None else (torch.arange(5, 30).reshape(1, -1) % 90 + 4)
    with torch.no_grad():
        return model.eval()(ids).logits
