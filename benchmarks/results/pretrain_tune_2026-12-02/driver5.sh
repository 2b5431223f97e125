#!/bin/bash
# Fifth plan: fair baselines with 6 tuning epochs on coarse-to-fine.
# Waits for driver.sh (pid 4746) to finish. Same FLAGS except the one changed setting.

cd /work/wt/bench
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt/bench/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
CACHE=/tmp/bench_runs/cache
FLAGS="--coarse-source-size 10000 --coarse-pretrain-epochs 4 --source-size 10000 --pretrain-epochs 4 --train-size 3000 --calibration-size 1000 --test-size 5000"
B="python benchmarks/pretrain_tune.py --threads 1 --cache-dir $CACHE $FLAGS"
step() { name=$1; shift; echo "=== $name start $(date -u +%FT%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; /usr/bin/time -v $B --output /tmp/bench_runs/$name "$@" > /tmp/bench_runs/$name.log 2>&1; echo "=== $name end rc=$? $(date -u +%FT%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; }

step c2f_epochs6_fair --epochs 6 --proxy coarse-to-fine --variants static_peft_moment,dmpo_final_moment --seeds 1
