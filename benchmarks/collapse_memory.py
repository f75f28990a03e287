"""Benchmark: peak RSS of `splice collapse` on a ~360 MB bf16 Mixtral vs loading it whole.

Issue 14's memory target: collapse streams layer by layer, so its peak RSS is bounded by one
layer's experts plus the calibration activations, not by the model size. The benchmark MoE is
synthetic (written tensor by tensor, seeded; 16 layers, 8 experts of width 512 on hidden 768,
vocab 4000: 182M parameters, 364 MB in bf16; one layer's experts 9.4M parameters, 38 MB in
float32). Each command runs in a fresh process on one thread; the reference is what any
implementation that loads the model first pays: ``AutoModelForCausalLM.from_pretrained`` in
float32 and one forward pass over the same calibration windows. Run:
`python benchmarks/collapse_memory.py`; writes ``benchmarks/results/collapse_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch
from common import _seeded, measure, write_tokenizer

from splice.arch import ArchSpec
from splice.writer import CheckpointWriter, TensorSpec

SPLICE = str(Path(sys.executable).with_name("splice"))
SHAPE = dict(hidden_size=768, intermediate_size=512, num_hidden_layers=16, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=4000, num_local_experts=8, num_experts_per_tok=2)  # fmt: skip


def make_mixtral(out: Path, layers: int = 16) -> Path:
    """A synthetic Mixtral with per-expert tensors, N(0, 0.02) weights (routers N(0, 0.2))."""
    if out.exists():
        return out
    s = dict(SHAPE, num_hidden_layers=layers)
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
           "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2, "torch_dtype": "bfloat16", **s}  # fmt: skip
    spec = ArchSpec.load("mixtral")
    h, i, v, e = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_local_experts"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    layer = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
             "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
             "block_sparse_moe.gate.weight": (e, h), "input_layernorm.weight": (h,),
             "post_attention_layernorm.weight": (h,)}  # fmt: skip
    expert = {"w1.weight": (i, h), "w3.weight": (i, h), "w2.weight": (h, i)}
    specs = [TensorSpec(spec.embed, (v, h), "bfloat16")]
    for n in range(s["num_hidden_layers"]):
        specs += [TensorSpec(spec.layer_name(n, k), sh, "bfloat16") for k, sh in layer.items()]
        specs += [TensorSpec(spec.layer_name(n, k, x), sh, "bfloat16")
                  for x in range(e) for k, sh in expert.items()]  # fmt: skip
    specs += [
        TensorSpec(spec.final_norm, (h,), "bfloat16"),
        TensorSpec(spec.lm_head, (v, h), "bfloat16"),
    ]
    with CheckpointWriter(out, specs, max_shard_size="1GB") as w:
        for t in specs:
            x = _seeded(t.name, 0, t.shape) * (0.2 if "gate.weight" in t.name else 0.02)
            if "norm" in t.name:
                x += 1.0
            w.write(t.name, x)
        w.write_config(cfg)
        write_tokenizer(w.tmp, v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="/tmp/splice-bench", type=Path)
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (16: 365 MB)")
    ap.add_argument("--only", help="comma-separated run names (default: all)")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows (16)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per window (128)")
    ap.add_argument(
        "--json", type=Path, help="results file (default results/collapse_memory[-Nlayers].json)"
    )
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.layers == 16 else f"-{args.layers}layers"
    model = make_mixtral(args.workdir / f"mixtral-360mb{suffix}", args.layers)
    size_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e6
    text = args.workdir / "words.txt"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPE["vocab_size"], (args.windows * args.seq_len + 64,), generator=g)
    text.write_text("\n".join(" ".join(f"w{int(t)}" for t in ids[k : k + 32])
                              for k in range(0, len(ids), 32)))  # fmt: skip
    out = args.workdir / "collapsed"
    cal = ["--calibration", str(text), "--seq-len", str(args.seq_len), "--max-samples",
           str(args.windows), "--device", "cpu", "--threads", "1", "--no-progress", "--overwrite"]  # fmt: skip
    runs = {
        "uniform (no calibration)": [
            "--method",
            "uniform",
            "--threads",
            "1",
            "--no-progress",
            "--overwrite",
        ],
        "frequency": ["--method", "frequency", *cal],
        "slice": ["--method", "slice", *cal],
        "keep 2 merge": ["--keep-experts", "2", *cal],
        "keep 2 prune": ["--keep-experts", "2", "--prune", *cal],
    }
    whole = (
        "import torch, sys; torch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM\n"
        "from splice.calib import calibration_text, token_windows\n"
        "from splice.modeling import load_tokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(model)!r}, dtype=torch.float32)\n"
        f"w = token_windows(load_tokenizer({str(model)!r}), calibration_text({str(text)!r}), "
        f"{args.seq_len}, {args.windows})\n"
        "with torch.inference_mode():\n"
        "    [m(b) for b in torch.split(w, 8)]\n"
    )
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    results = {}
    r = measure([sys.executable, "-c", whole])
    results["load whole (float32) + forward"] = r
    print(
        f"{'load whole (float32) + forward':<28} {r.wall_s:7.1f} s {r.peak_rss_mb:7.0f} MB rc {r.returncode}"
    )
    imp = measure(
        [sys.executable, "-c", "import torch, transformers.models.mixtral.modeling_mixtral"]
    )
    results["import torch + transformers"] = imp
    for name, extra in runs.items():
        shutil.rmtree(out, ignore_errors=True)
        r = measure([SPLICE, "collapse", str(model), str(out), *extra])
        results[name] = r
        print(f"{name:<28} {r.wall_s:7.1f} s {r.peak_rss_mb:7.0f} MB rc {r.returncode}")
    data = {
        "model_mb": size_mb,
        "shape": dict(SHAPE, num_hidden_layers=args.layers),
        "one_layer_experts_float32_mb": 3
        * SHAPE["hidden_size"]
        * SHAPE["intermediate_size"]
        * SHAPE["num_local_experts"]
        * 4
        / 1e6,
        "calibration_tokens": args.windows * args.seq_len,
        "runs": {k: vars(v) for k, v in results.items()},
    }
    if args.json is None:
        args.json = Path(__file__).parent / f"results/collapse_memory{suffix}.json"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(
        f"model {size_mb:.0f} MB bf16; import baseline {imp.peak_rss_mb:.0f} MB; wrote {args.json}"
    )


if __name__ == "__main__":
    main()
