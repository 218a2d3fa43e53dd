#!/usr/bin/env bash
# The GPU checks, as one script for the lent GPU machine (torch, Triton, transformers and
# pytest there; no vLLM, no network, so the trainer runs on a random-weight target with
# SmolLM2's shapes). Each part has its own time limit so one cannot eat the others' time.
# Usage (repo root):  OUT=/tmp/gpu bash benchmarks/gpu/check.sh   (~8 min on an H100)
# Writes $OUT/gpu-check.tar.gz (every JSON/markdown/PNG and log) and $OUT/summary.log.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
res=$(mktemp -d)
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$res/device.txt" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/benchmarks/test_bench_feature_sampling.py \
  > "$res/pytest.log" 2>&1; echo "pytest rc=$?" >> "$res/rc.txt"
timeout 200 python3 benchmarks/bench_grouped_lm_head.py --preset full --out "$res/grouped_lm_head" \
  > "$res/grouped_lm_head.log" 2>&1; echo "grouped_lm_head rc=$?" >> "$res/rc.txt"
timeout 60 python3 benchmarks/bench_feature_sampling.py --preset full --out "$res/feature_sampling" \
  > "$res/feature_sampling.log" 2>&1; echo "feature_sampling rc=$?" >> "$res/rc.txt"
for bt in 2048 16384; do
  timeout 75 python3 benchmarks/bench_trainer.py --preset cuda --device cuda --batch-tokens $bt \
    --target-config benchmarks/configs/smollm2-135m-target.json --out "$res/trainer-$bt" \
    > "$res/trainer-$bt.log" 2>&1; echo "trainer-$bt rc=$?" >> "$res/rc.txt"
done
tar -czf "$OUT/gpu-check.tar.gz" -C "$res" .
{ cat "$res/device.txt" "$res/rc.txt"; tail -n 15 "$res/pytest.log"; cat "$res"/*/*.md; } > "$OUT/summary.log"
cat "$OUT/summary.log"
