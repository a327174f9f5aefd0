#!/usr/bin/env bash
# Cost and success of every sampler on the default task (issue 4's table), from scratch: scripted
# demos -> a diffusion MLP policy with Tp = 8 > Ta = 4 (RTI warm-starts from the 4 actions past
# the executed slice) and a streaming policy (h = 2 sub-chunks, 3 network calls per call) ->
# `dppo bench inference` on both checkpoints, EPISODES episodes per sampler.
#
#   bash scripts/bench_samplers_point_reach.sh [OUT]      (default OUT=runs/bench-samplers)
#
# Result: $OUT/bench_inference.json (one row per sampler: NFE, ms, overhead, success_rate).
set -euo pipefail
OUT=${1:-runs/bench-samplers}
SEED=${SEED:-0}
STEPS=${STEPS:-3000}
EPISODES=${EPISODES:-100}
RTI_STEPS=${RTI_STEPS:-[12,6,0]}  # warm steps of the 20-step schedule ([8,4,0]: 0.39 here)

[ -d "$OUT/demos" ] || dppo demos n_episodes=100 seed=$SEED out=$OUT/demos
for kind in diffusion streaming; do
  policy=$([ $kind = streaming ] && echo streaming || echo mlp)
  [ -d "$OUT/$kind/checkpoints" ] || dppo pretrain policy=$policy dataset=$OUT/demos \
    out=$OUT/$kind task.horizon=8 train.steps=$STEPS train.seed=$SEED train.eval_every=0 \
    final_eval_episodes=0
done
dppo bench inference "checkpoint=[$OUT/diffusion,$OUT/streaming]" networks=[] \
  n_episodes=$EPISODES "sampler_options.rti.steps=$RTI_STEPS" clock=cpu threads=1 \
  out=$OUT/bench_inference.json
