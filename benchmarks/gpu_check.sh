#!/usr/bin/env bash
# Every --device cuda path of splice on the zoo, in a few minutes, for the day a GPU is lent:
# merge (its result against the CPU's), the calibration collectors (analyze activations, prune
# by angular distance, slice), eval (log-likelihood and generation), heal, collapse, and evolve
# with --workers (one model per worker on the GPU) and Sakana's data-flow space with racing.
# Each step's wall time and exit code go to benchmarks/results/gpu_check.json; the script
# exits 1 if any step failed. On a machine without a GPU: DEVICE=cpu checks the script.
#
#   benchmarks/gpu_check.sh                # DEVICE=cuda, WORKERS=2
#   DEVICE=cpu benchmarks/gpu_check.sh     # the same steps on the CPU (slower, no GPU needed)
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
WORKERS="${WORKERS:-2}"
PY="${PY:-.venv/bin/python}"
SPLICE=("$PY" -m splice.cli)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/splice-gpu-check.XXXXXX")"
RESULTS="${RESULTS:-benchmarks/results/gpu_check.json}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
trap 'rm -rf "$WORK"' EXIT

"$PY" - "$DEVICE" <<'EOF' || exit 2
import sys, torch
dev = sys.argv[1]
if dev.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"gpu_check: --device {dev} asked, and torch sees no GPU (DEVICE=cpu runs the steps on the CPU)")
print(f"gpu_check: torch {torch.__version__}, device {dev}"
      + (f" ({torch.cuda.get_device_name(0)})" if dev.startswith("cuda") else ""))
EOF

declare -a NAMES=() SECONDS_=() CODES=()
step() {  # step NAME COMMAND...: run, time, record
    local name="$1"; shift
    local t0=$EPOCHREALTIME
    "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    local t1=$EPOCHREALTIME
    NAMES+=("$name"); CODES+=("$rc"); SECONDS_+=("$(awk "BEGIN {print $t1 - $t0}")")
    printf '%-28s rc=%d %6.1f s\n' "$name" "$rc" "${SECONDS_[-1]}"
    [ "$rc" -eq 0 ] || tail -5 "$WORK/$name.log"
}

Z=assets/zoo
step merge "${SPLICE[@]}" merge examples/recipes/ties.yml "$WORK/ties-dev" --device "$DEVICE" --no-progress
step merge-cpu "${SPLICE[@]}" merge examples/recipes/ties.yml "$WORK/ties-cpu" --device cpu --no-progress
step merge-matches-cpu "$PY" - "$WORK/ties-dev" "$WORK/ties-cpu" <<'EOF'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{d}/model.safetensors") for d in sys.argv[1:3])
worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"max abs difference against the CPU merge: {worst:.3g}")
sys.exit(0 if worst < 1e-5 else 1)
EOF
step analyze-activations "${SPLICE[@]}" analyze activations "$Z/base" --calibration zoo --device "$DEVICE" --json
step prune-angular "${SPLICE[@]}" prune "$Z/base" "$WORK/pruned" --n 2 --calibration zoo --device "$DEVICE" --no-progress
step slice "${SPLICE[@]}" slice "$Z/base" "$WORK/sliced" --sparsity 0.25 --calibration zoo --device "$DEVICE" --no-progress
step eval "${SPLICE[@]}" eval "$Z/base" --ppl zoo --device "$DEVICE"
step eval-generate "${SPLICE[@]}" eval "$Z/math" --tasks zoo_math_gen --device "$DEVICE"
step heal "${SPLICE[@]}" heal "$WORK/pruned" "$WORK/healed" --steps 20 --calibration zoo --device "$DEVICE" --no-progress
step collapse "${SPLICE[@]}" collapse "$Z/moe" "$WORK/collapsed" --calibration zoo --device "$DEVICE" --no-progress
step evolve "${SPLICE[@]}" evolve examples/evolve/zoo_ps.yml --out "$WORK/run" --device "$DEVICE" --workers "$WORKERS" --max-fevals 8 --no-progress
step evolve-dfs-racing "${SPLICE[@]}" evolve examples/evolve/zoo_dfs_w.yml --out "$WORK/dfs" --device "$DEVICE" --max-fevals 8 --no-progress

"$PY" - "$RESULTS" "$DEVICE" "$WORKERS" "${#NAMES[@]}" "${NAMES[@]}" "${SECONDS_[@]}" "${CODES[@]}" <<'EOF'
import json, sys
out, device, workers, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
names, secs, codes = sys.argv[5:5 + n], sys.argv[5 + n:5 + 2 * n], sys.argv[5 + 2 * n:5 + 3 * n]
steps = {k: {"wall_s": float(s), "returncode": int(c)} for k, s, c in zip(names, secs, codes)}
json.dump({"device": device, "workers": workers, "steps": steps}, open(out, "w"), indent=2)
print(f"wrote {out}")
EOF
for rc in "${CODES[@]}"; do [ "$rc" -eq 0 ] || exit 1; done
