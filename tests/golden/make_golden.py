"""Freeze mergekit's outputs on tiny models as golden tensors, for ``tests/test_merge_golden.py``.

Run by hand, from the repository root, where mergekit is installed (pyproject's dev extra)::

    HF_HUB_OFFLINE=1 .venv/bin/python tests/golden/make_golden.py

It writes three tiny float32 llama checkpoints (``inputs.write_models``: seeded, bit
reproducible) to a temporary folder, runs every recipe of ``inputs.RECIPES`` through mergekit's
own ``mergekit-yaml`` code path (``run_merge``, CPU, random seed 0) and saves

* ``mergekit_golden.safetensors``: for each recipe the tensors ``inputs.saved(recipe)`` of
  mergekit's output, keyed ``"{recipe}/{tensor name}"``, in the dtype mergekit wrote;
* ``recipes.json``: the recipe texts, the input models' shape, seeds and fingerprint, each
  output's layout (a hash of its tensor names, shapes and dtypes) and the mergekit, torch and
  Python versions used.

Rerun it (and commit both files) after changing ``inputs.py``; ``test_merge_golden.py`` checks
that the recipes and the input fingerprint are still those the goldens were made from. splice is
not used here: the goldens are mergekit's alone.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, so that ``golden.inputs`` imports as in the test

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from golden import inputs  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def run_mergekit(text: str, out: Path) -> dict[str, torch.Tensor]:
    """One recipe through mergekit (as ``mergekit-yaml CONFIG OUT --random-seed 0
    --no-copy-tokenizer --no-write-model-card`` does); every output tensor."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(
        device="cpu",
        random_seed=0,
        copy_tokenizer=False,
        write_model_card=False,
        quiet=True,
    )
    options.apply_global_options()
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out), options=options, config_source=text)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def main() -> None:
    golden: dict[str, torch.Tensor] = {}
    record: dict = {
        "about": "mergekit outputs frozen by tests/golden/make_golden.py; see its docstring",
        "versions": {
            "mergekit": importlib.metadata.version("mergekit"),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "inputs": {
            "config": inputs.CONFIG,
            "seeds": inputs.SEEDS,
            "base_scale": inputs.BASE_SCALE,
            "delta_scale": inputs.DELTA_SCALE,
        },
        "recipes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folders, fp = inputs.write_models(Path(tmp) / "models")
        record["inputs"]["fingerprint"] = fp
        for name, text in inputs.RECIPES.items():
            print(f"mergekit: {name}", flush=True)
            out = run_mergekit(inputs.concrete(text, folders), Path(tmp) / "out" / name)
            for tensor in inputs.saved(name):
                golden[f"{name}/{tensor}"] = out[tensor].contiguous()
            record["recipes"][name] = {
                "text": text,
                "layout": inputs.layout(out),
                "tensors": len(out),
            }
    save_file(golden, str(HERE / "mergekit_golden.safetensors"), metadata={"format": "pt"})
    (HERE / "mergekit_golden.safetensors").chmod(0o644)  # save_file's temporary file is 0600
    (HERE / "recipes.json").write_text(json.dumps(record, indent=1) + "\n")
    size = sum((HERE / f).stat().st_size for f in ("mergekit_golden.safetensors", "recipes.json"))
    print(f"wrote {len(golden)} tensors of {len(inputs.RECIPES)} recipes, {size} bytes")


if __name__ == "__main__":
    main()
