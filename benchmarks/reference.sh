#!/usr/bin/env bash
# Reproduce the committed reference results in benchmarks/results/reference-smollm2/:
# SmolLM2-135M-Instruct target, the drafters committed under checkpoints/smollm2-135m/
# (train your own with the README's "Train a drafter" commands and point
# benchmarks/configs/smollm2-135m.json at them), on MT-bench, GSM8K and HumanEval.
#
#   benchmarks/reference.sh [OUT]        # default OUT=benchmarks/results/reference-smollm2
#
# Sizes are set for a 2-core CPU (about 75 min offline + 15 min served); scale them with
# MT_BENCH=80 GSM8K=100 HUMANEVAL=164 MAX_TOKENS=128 SERVE_PROMPTS=16 SERVE_MAX_TOKENS=64.
# SKIP_OFFLINE=1 / SKIP_SERVE=1 leave a part out (the report merges what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-benchmarks/results/reference-smollm2}"
Q="$OUT/questions"
CLI=.venv/bin/vllm-coral
MAX_TOKENS="${MAX_TOKENS:-128}"
export HF_HUB_OFFLINE=1

mkdir -p "$Q"
$CLI bench questions mt_bench --limit "${MT_BENCH:-24}" --out "$Q/mt_bench.jsonl"
$CLI bench questions gsm8k --limit "${GSM8K:-100}" --out "$Q/gsm8k.jsonl"
$CLI bench questions humaneval --limit "${HUMANEVAL:-48}" --out "$Q/humaneval.jsonl"
QUESTIONS=(--questions "mt_bench=$Q/mt_bench.jsonl" --questions "gsm8k=$Q/gsm8k.jsonl"
           --questions "humaneval=$Q/humaneval.jsonl")

if [[ "${SKIP_OFFLINE:-0}" != 1 ]]; then
    # T=0 and T=1 (seeded); at T=1 both draft sampling modes. 8 requests per vLLM call.
    $CLI bench offline --methods benchmarks/configs/smollm2-135m.json "${QUESTIONS[@]}" \
        --temperature 0 1 --max-tokens "$MAX_TOKENS" --batch-size 8 --out "$OUT/offline" || true
fi
if [[ "${SKIP_SERVE:-0}" != 1 ]]; then
    # vllm serve at concurrency 1, 4, 16 on the first MT-bench questions (both turns), T=0.
    $CLI bench serve --methods benchmarks/configs/smollm2-135m.json \
        --questions "mt_bench=$Q/mt_bench.jsonl" --num-prompts "${SERVE_PROMPTS:-16}" \
        --concurrency 1 4 16 --max-tokens "${SERVE_MAX_TOKENS:-64}" --out "$OUT/serve" || true
fi
RUNS=()
for part in offline serve; do [[ -f "$OUT/$part/bench_$part.json" ]] && RUNS+=("$OUT/$part"); done
$CLI bench report "${RUNS[@]}" --out "$OUT"
