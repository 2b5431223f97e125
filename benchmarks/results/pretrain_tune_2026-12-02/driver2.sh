#!/bin/bash
# Second, concurrent plan (helper "bench"): the same-labels fair set, 1 seed; same FLAGS as driver.sh.
cd /work/wt/bench
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt/bench/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
CACHE=/tmp/bench_runs/cache
FLAGS="--coarse-source-size 10000 --coarse-pretrain-epochs 4 --source-size 10000 --pretrain-epochs 4 --train-size 3000 --epochs 3 --calibration-size 1000 --test-size 5000"
B="python benchmarks/pretrain_tune.py --threads 1 --cache-dir $CACHE $FLAGS"
step() { name=$1; shift; echo "=== $name start $(date -u +%FT%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; /usr/bin/time -v $B --output /tmp/bench_runs/$name "$@" > /tmp/bench_runs/$name.log 2>&1; echo "=== $name end rc=$? $(date -u +%FT%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; }
step same_fair_s0 --proxy same-labels --variants dmpo,dmpo_final_moment,static_peft_moment,sdn_linear,sdn_moment,static_peft --seeds 1 --other-seeds 1
