#!/usr/bin/env bash
# Step time and peak RSS against sequence length, bfpo-lite's CPU engine against PyTorch + PEFT,
# one run per length on the same machine (scripts/bench-shapes.sh at 1 pair per step).
#
#   usage: scripts/bench-sweep.sh BFPO_BIN PEER_PYTHON MODEL.gguf [LENGTHS...]
#
# LENGTHS default to 128 256 512 1024 2048. The pairs are written by scripts/long-pairs.py long
# enough for the longest length (prompts truncated to half of it, as TRL does). Prints one line
# per length: length, our step and RSS, the peer's, and both ratios (peer/ours for time,
# ours/peer for memory).
set -euo pipefail
bin=$1; py=$2; model=$3; shift 3
lengths=("$@")
[ ${#lengths[@]} -gt 0 ] || lengths=(128 256 512 1024 2048)
here=$(cd "$(dirname "$0")" && pwd)
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
max=0; for l in "${lengths[@]}"; do [ "$l" -gt "$max" ] && max=$l; done
python3 "$here/long-pairs.py" --pairs 2 --prompt-words "$max" --response-words "$max" >"$t/pairs.jsonl"
printf '%-7s %10s %10s %10s %10s %7s %7s\n' length ours_s ours_mib peer_s peer_mib ratio rss
for l in "${lengths[@]}"; do
  out=$(bash "$here/bench-shapes.sh" "$bin" "$py" "$model" "$t/pairs.jsonl" \
    --max-length "$l" --pairs 1 --micro-pairs 1 --steps 1)
  python3 - "$l" <<PY
import json, sys
lines = """$out""".strip().splitlines()
ours, peer = json.loads(lines[0]), json.loads(lines[1])
print("%-7s %10.2f %10d %10.2f %10d %7.2f %7.2f" % (sys.argv[1], ours["step_s"], ours["peak_rss_mib"],
      peer["step_s"], peer["peak_rss_mib"], peer["step_s"] / ours["step_s"],
      ours["peak_rss_mib"] / peer["peak_rss_mib"]))
PY
done
