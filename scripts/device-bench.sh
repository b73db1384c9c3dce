#!/usr/bin/env bash
# The H200 measurement of issue #10 (BENCHMARKS.md, "second round"), as run through the session's
# device tool. The device machine gets only the repository and at most 64 MiB of ignored files
# per call, so the inputs are staged in three calls into /tmp/stage on the same warm machine:
#   1. `split -b 60000000 SmolLM2-135M-Instruct.Q4_1.gguf m.` → carry m.aa, copy to /tmp/stage;
#   2. carry m.ab, the Vulkan loader's Debian packages (`apt-get download libvulkan1 libegl1
#      libglvnd0 libopengl0 libgl1 libglx0 libgles2` into gl/), the gguf wheel (wheels/),
#      shared/bench/{side-by-side.sh,peer_pytorch.py,pairs.jsonl} (bench/) and the old binary
#      (bfpo-lite-old.xz); copy to /tmp/stage;
#   3. carry this script with the stripped, xz-compressed binaries (bfpo-lite, the bench
#      binaries of `cargo bench --no-run`, the GPU test binaries as t-NAME) and run it.
# Everything it measures is written to $OUT.
set -u
S=/tmp/stage
# Test binaries built here keep this checkout's CARGO_TARGET_TMPDIR.
mkdir -p "${BUILD_TARGET_TMP:-/work/main/target/tmp}"
cp -r "${STAGE_IN:-.device/s3}"/* $S/
exec > >(tee "$OUT/log.txt") 2>&1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
for f in $S/gl/*.deb; do dpkg -x "$f" / ; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export XDG_RUNTIME_DIR=/tmp/xdg; mkdir -p -m700 $XDG_RUNTIME_DIR
mkdir -p /tmp/m /tmp/bin /tmp/py
M=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
cat $S/m.aa $S/m.ab > $M
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $M" | sha256sum -c || exit 3
pip install -q --no-deps --target /tmp/py $S/wheels/gguf-*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/py
for f in $S/*.xz; do n=/tmp/bin/$(basename "$f" .xz); xz -dc "$f" > $n; chmod +x $n; done
ls /tmp/bin; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
/tmp/bin/bfpo-lite devices 2>&1 | head -5
el "side by side (new)"
timeout 150 bash $S/bench/side-by-side.sh /tmp/bin/bfpo-lite python3 $M --device cuda --dtype bf16 2>&1 | tail -4 | tee $OUT/sbs.txt
step() { python3 - "$1" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if '"split":"train"' in l.replace(" ", "")]
e = [r["elapsed_seconds"] for r in rows]
print(statistics.median([b - a for a, b in zip(e, e[1:])]))
PY
}
el "our side alone: old binary, new, new with --activation-memory 0"
TUNE="tune --model $M --data $S/bench/pairs.jsonl --max-steps 4 --pairs-per-step 4 --grad-accum 1 --rank 16 --lora-alpha 16 --targets ffn_down --no-ref-cache --force"
for b in bfpo-lite-old bfpo-lite; do
  timeout 60 /tmp/bin/$b $TUNE --out /tmp/r-$b > /tmp/r-$b.log 2>&1; echo "$b step: $(step /tmp/r-$b/metrics.jsonl) s" | tee -a $OUT/steps.txt
done
timeout 60 /tmp/bin/bfpo-lite $TUNE --activation-memory 0 --out /tmp/r-ckpt > /tmp/r-ckpt.log 2>&1; echo "bfpo-lite --activation-memory 0 step: $(step /tmp/r-ckpt/metrics.jsonl) s" | tee -a $OUT/steps.txt
BFPO_ATTN=rows BFPO_ATTN_BACK=rows timeout 60 /tmp/bin/bfpo-lite $TUNE --out /tmp/r-rows > /tmp/r-rows.log 2>&1; echo "bfpo-lite with per-row attention kernels step: $(step /tmp/r-rows/metrics.jsonl) s" | tee -a $OUT/steps.txt
grep -h "activations:\|engine:" /tmp/r-bfpo-lite.log | tee -a $OUT/steps.txt
tail -3 /tmp/r-bfpo-lite.log
el "profile"
timeout 90 /tmp/bin/bfpo-lite $TUNE --profile --out /tmp/r-prof > $OUT/profile-run.txt 2>&1; cp /tmp/r-prof/profile.json $OUT/ 2>/dev/null
el "host overhead benches"
for b in host_overhead-old host_overhead; do echo "== $b"; timeout 40 /tmp/bin/$b --bench 2>&1 | grep -E "time:|thrpt:"; done | tee $OUT/bench-host.txt
el "matmul split-K"
if [ -x /tmp/bin/matmul ]; then
  for s in off auto; do echo "== split $s T=512"; BFPO_BENCH_SPLITK=$s BFPO_BENCH_ITERS=50 BFPO_BENCH_T=512 BFPO_BENCH_FILTER=fwd/Q4_1 timeout 60 /tmp/bin/matmul --bench 2>&1 | tail -12; done > $OUT/bench-matmul.txt 2>&1
fi
el "attention backward and LoRA benches"
timeout 60 /tmp/bin/backward --bench smollm2-135m 2>&1 | grep -E "smollm2|time:|thrpt:" > $OUT/bench-attn.txt
BFPO_BENCH_LORA_LARGE=1 timeout 100 /tmp/bin/backward --bench lora 2>&1 | grep -E "lora|time:|thrpt:" > $OUT/bench-lora.txt
el "GPU tests on the H200"
for t in /tmp/bin/t-*; do echo "== $t"; timeout 120 $t --test-threads 8 2>&1 | grep -E "test result|FAILED|panicked" | head -5; done | tee $OUT/tests.txt
el "done"
