#!/usr/bin/env bash
# One CUDA GPU, in one go: the README's default run end to end (bf16, configs/accelerate/1gpu-bf16.yaml) and
# its evaluation, then the speed benchmarks (bf16 autocast, diffusers side by side, torch.compile).
#   pip install -e ".[bench]" && bash bench/gpu.sh OUT_DIR
# Each step has a time limit, writes OUT_DIR/<step>.log and prints its tail; a failed step does not stop the rest.
set -uo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR}
run=${GPU_RUN_DIR:-/tmp/mmdit-gpu-run}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

step() {
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s"
    grep -v "it/s\]\|s/it\]" "$out/$name.log" | tail -n 30
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
rm -rf "$run"
step train 200 accelerate launch --config_file configs/accelerate/1gpu-bf16.yaml train/train.py \
    train.output_dir="$run"
cp "$run"/dit/samples-*.png "$out/" 2>/dev/null
step eval 60 python eval/eval.py --model "$run" --out "$run/eval" --metrics composition --num-samples 500
cp "$run/eval/report.md" "$out/eval-report.md" 2>/dev/null
step bench_train 120 python bench/bench_train.py --device cuda --setting matched,default,gpu --mode cross,joint \
    --dtype bf16 --reps 20 --compare-diffusers
step bench_sample 50 python bench/bench_sample.py --device cuda --dtype bf16 --num-images 64 --reps 3
step bench_compile 100 python bench/bench_train.py --device cuda --setting gpu --mode cross --dtype bf16 --reps 20 \
    --compile
