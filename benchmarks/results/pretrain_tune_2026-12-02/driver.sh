#!/bin/bash
# Sequential benchmark plan (helper "bench"); each step writes a NEW folder under /tmp/bench_runs.
# Reduced sizes (the 2 cores are shared by ~6 agents, load ~8): see FLAGS.
cd /work/wt/bench
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt/bench/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
CACHE=/tmp/bench_runs/cache
FLAGS="--coarse-source-size 10000 --coarse-pretrain-epochs 4 --source-size 10000 --pretrain-epochs 4 --train-size 3000 --epochs 3 --calibration-size 1000 --test-size 5000"
B="python benchmarks/pretrain_tune.py --threads 1 --cache-dir $CACHE $FLAGS"
FAIR=dmpo,sdn_linear,sdn_moment,static_peft,static_peft_moment,dmpo_final_moment
step() { name=$1; shift; echo "=== $name start $(date -u +%FT%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; /usr/bin/time -v $B --output /tmp/bench_runs/$name "$@" > /tmp/bench_runs/$name.log 2>&1; echo "=== $name end rc=$? $(date -u +%FT%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; }
step c2f_fair_s0 --proxy coarse-to-fine --variants $FAIR --seeds 1 --other-seeds 1
step c2f_seeds12 --proxy coarse-to-fine --variants dmpo,sdn_linear --seeds 2 --seed-start 1
step same_fair_s0 --proxy same-labels --variants $FAIR --seeds 1 --other-seeds 1
step c2f_ablation_s0 --proxy coarse-to-fine --variants sdn_bypass,phase1_only,sdn_isqrt_cov,distill_last,switch_25,switch_75,dmpo_isqrt_cov --seeds 1 --other-seeds 1
step c2f_rules_s0 --proxy coarse-to-fine --variants exit_entropy,exit_patience --seeds 1 --other-seeds 1
