#!/usr/bin/env bash
# The same BFPO step as shared/bench/side-by-side.sh, at a chosen model and length: bfpo-lite's CPU
# engine against PyTorch + PEFT on the CPU, one run, same machine, step time and peak RSS of each.
#
#   usage: scripts/bench-shapes.sh BFPO_BIN PEER_PYTHON MODEL.gguf PAIRS.jsonl \
#            [--max-length 512] [--pairs 4] [--micro-pairs 1] [--steps 1] [--threads N]
#
# Both sides: LoRA rank 16 (alpha 16) on ffn_down / down_proj, AdamW, the BFPO loss (tau 0.01),
# reference log-probs before the timed steps, one untimed warm-up step, `--pairs` pairs per step
# in micro-batches of `--micro-pairs` pairs (gradient accumulation), sequences truncated as TRL
# does to `--max-length` tokens with prompts to half of it. Peak RSS is the whole process's
# (`/usr/bin/time -f %M`), reference pass and model load included.
#
# Models: `bfpo-lite init-model` writes synthetic weights at real shapes, e.g. Qwen2.5-0.5B:
#   bfpo-lite init-model --arch qwen2 --type q8_0 --dim 896 --layers 24 --heads 14 --kv-heads 2 \
#     --ff 4864 --vocab-extra 151000 --ctx 4096 --tied --out qwen05b-q8_0.gguf
# and long pairs with `scripts/long-pairs.py`. The peer loads the same GGUF through transformers.
# Prints one JSON line per side, then `ratio R` (peer step / ours; R > 1: bfpo-lite is faster)
# and `rss_ratio Q` (ours / peer).
set -euo pipefail
bin=$1; py=$2; model=$3; pairs=$4; shift 4
max_len=512; npairs=4; micro=1; steps=1; threads=$(nproc)
while [ $# -gt 0 ]; do
  case $1 in
    --max-length) max_len=$2; shift 2 ;;
    --pairs) npairs=$2; shift 2 ;;
    --micro-pairs) micro=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ $((npairs % micro)) -eq 0 ] || { echo "--pairs must be a multiple of --micro-pairs" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
peer_script=${PEER_SCRIPT:-$here/../../shared/bench/peer_pytorch.py}
[ -f "$peer_script" ] || { echo "peer script not found: $peer_script (set PEER_SCRIPT)" >&2; exit 2; }
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT

/usr/bin/time -f %M -o "$t/ours.rss" "$bin" tune --engine cpu --threads "$threads" \
  --model "$model" --data "$pairs" --max-steps $((steps + 1)) --pairs-per-step "$micro" \
  --grad-accum $((npairs / micro)) --rank 16 --lora-alpha 16 --targets ffn_down \
  --max-length "$max_len" --max-prompt-length $((max_len / 2)) --no-ref-cache \
  --out "$t/ours" --force >"$t/ours.log" 2>&1 || { tail -n 5 "$t/ours.log" >&2; exit 1; }
ours=$(python3 - "$t/ours/metrics.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if '"split":"train"' in l.replace(" ", "")]
e = [r["elapsed_seconds"] for r in rows]
print(statistics.median([b - a for a, b in zip(e, e[1:])]))
PY
)
ours_rss=$(( $(tail -n 1 "$t/ours.rss") / 1024 ))

SMOLLM2_DIR=$(dirname "$model") /usr/bin/time -f %M -o "$t/peer.rss" "$py" "$peer_script" "$pairs" \
  --gguf-file "$(basename "$model")" --steps "$steps" --pairs "$npairs" --micro-pairs "$micro" \
  --warmup 1 --threads "$threads" --device cpu --dtype fp32 --rank 16 --alpha 16 \
  --targets down_proj --max-length "$max_len" --max-prompt-length $((max_len / 2)) \
  >"$t/peer.log" 2>"$t/peer.err" || { tail -n 5 "$t/peer.err" >&2; exit 1; }
peer=$(tail -n 1 "$t/peer.log" | python3 -c "import json,sys; print(json.load(sys.stdin)['step_s_median'])")
peer_rss=$(( $(tail -n 1 "$t/peer.rss") / 1024 ))

echo "{\"side\":\"bfpo-lite cpu\",\"step_s\":$ours,\"peak_rss_mib\":$ours_rss,\"threads\":$threads,\"max_length\":$max_len,\"pairs\":$npairs,\"micro_pairs\":$micro}"
echo "{\"side\":\"pytorch+peft fp32\",\"step_s\":$peer,\"peak_rss_mib\":$peer_rss,\"threads\":$threads,\"max_length\":$max_len,\"pairs\":$npairs,\"micro_pairs\":$micro}"
python3 -c "print('ratio %.3f' % ($peer / $ours)); print('rss_ratio %.3f' % ($ours_rss / $peer_rss))"
