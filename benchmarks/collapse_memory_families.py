"""Benchmark: `splice collapse` streams layer by layer on the MoE families, not only Mixtral.

Issue 25's memory target: collapsing or pruning grows peak RSS by less than 100 MB when the
model doubles in layers. For each family (Qwen3-MoE with a dense first layer; DeepSeek-V3 with
MLA, a dense first layer, a shared expert and grouped sigmoid routing; gpt-oss, whose experts
are stored packed, interleaved and transposed, read per expert and written packed again), a
random bf16 model is
built by transformers at L and 2L layers (hidden 512, 8 experts of width 512), and the peak RSS
of `splice collapse --method frequency` and `--keep-experts 4 --prune --by reap` is measured in
a fresh process on one thread, next to loading the model whole. Run:
`python benchmarks/collapse_memory_families.py`; writes
``benchmarks/results/collapse_memory_families.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import measure, write_tokenizer

SPLICE = str(Path(sys.executable).with_name("splice"))
SHAPE = dict(vocab_size=4000, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
             num_key_value_heads=8, moe_intermediate_size=512, num_experts_per_tok=2,
             max_position_embeddings=512)  # fmt: skip
FAMILIES = {
    "qwen3_moe": dict(num_experts=8, mlp_only_layers=[0], norm_topk_prob=True),
    "deepseek_v3": dict(
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=64,
        head_dim=32,
    ),
    "gpt_oss": dict(num_local_experts=8, head_dim=64, sliding_window=128),
}


def make(family: str, layers: int, out: Path) -> Path:
    """A random bf16 ``family`` model of ``layers`` layers, built once."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, **SHAPE, **FAMILIES[family], num_hidden_layers=layers)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    write_tokenizer(out, SHAPE["vocab_size"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/splice-bench", type=Path)
    ap.add_argument("--layers", type=int, default=8, help="L (the other model has 2L)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                    help="measure these (the others' results in --json are kept)")  # fmt: skip
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", type=Path,
                    default=Path(__file__).parent / "results" / "collapse_memory_families.json")  # fmt: skip
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPE["vocab_size"], (args.windows * args.seq_len + 64,), generator=g)
    text = args.workdir / "words-families.txt"
    text.write_text("\n".join(" ".join(f"w{int(t)}" for t in ids[k : k + 32])
                              for k in range(0, len(ids), 32)))  # fmt: skip
    cal = ["--calibration", str(text), "--seq-len", str(args.seq_len), "--max-samples",
           str(args.windows), "--device", "cpu", "--threads", "1", "--no-progress", "--overwrite"]  # fmt: skip
    runs = {
        "frequency": ["--method", "frequency", *cal],
        "keep 4 prune --by reap": ["--keep-experts", "4", "--prune", "--by", "reap", *cal],
    }
    out = args.workdir / "collapsed-family"
    results: dict = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results = {k: v for k, v in results.items() if k in FAMILIES}
    for family in args.families:
        results[family] = {}
        for layers in (args.layers, 2 * args.layers):
            model = make(family, layers, args.workdir / f"{family}-{layers}")
            size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e6
            row: dict = {"model_mb": size}
            whole = (f"import torch; torch.set_num_threads(1)\nfrom transformers import "
                     f"AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({str(model)!r}, "
                     "dtype=torch.float32)\n")  # fmt: skip
            row["load whole (float32)"] = vars(measure([sys.executable, "-c", whole]))
            for name, extra in runs.items():
                shutil.rmtree(out, ignore_errors=True)
                r = measure([SPLICE, "collapse", str(model), str(out), *extra])
                assert r.returncode == 0, f"{family} {layers} {name} failed"
                row[name] = vars(r)
                print(f"{family:12s} {layers:3d} layers {size:6.0f} MB  {name:24s} "
                      f"{r.wall_s:6.1f} s {r.peak_rss_mb:6.0f} MB", flush=True)  # fmt: skip
            results[family][str(layers)] = row
        small, big = results[family][str(args.layers)], results[family][str(2 * args.layers)]
        for name in ("load whole (float32)", *runs):
            grow = big[name]["peak_rss_mb"] - small[name]["peak_rss_mb"]
            results[family].setdefault("growth_mb", {})[name] = grow
            print(f"{family:12s} {name:24s} peak grows {grow:+6.0f} MB from {args.layers} to "
                  f"{2 * args.layers} layers")  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps({"shape": SHAPE, "families": FAMILIES, **results},
                                    indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
