#!/usr/bin/env bash
# Offline fine-tuning in a learned world model (DiWA-style) on robosuite Lift: scripted demos -> a
# deliberately short pre-training (PRETRAIN_STEPS, so that the policy has room to improve); play
# data -> world model + success classifier; DPPO in imagination (zero env steps); real evaluation
# of the pre-trained and the fine-tuned policy (EVAL_EPISODES each). DPPO runs with the robomimic
# settings (algorithm=dppo_robomimic: actor lr 1e-5, clip 0.01), as online DPPO on robosuite does;
# the gym settings (lr 3e-4, clip 0.1) wreck the pre-trained grasp within 10 iterations.
#
#   bash scripts/offline_finetune_lift.sh [OUT]      (default OUT=runs/offline-lift)
#
# Results: $OUT/finetune/summary.json (online_env_steps: 0, play data size, real success per
# evaluation), $OUT/finetune/plots/imagination_vs_reality.png, $OUT/eval-{pretrained,finetuned}.
set -euo pipefail
OUT=${1:-runs/offline-lift}
SEED=${SEED:-0}
DEMOS=${DEMOS:-100}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1000}
PLAY_STEPS=${PLAY_STEPS:-50000}
ITERATIONS=${ITERATIONS:-30}
EVAL_EPISODES=${EVAL_EPISODES:-100}

[ -d "$OUT/demos" ] || dppo demos task=lift n_episodes=$DEMOS seed=$SEED out=$OUT/demos
[ -d "$OUT/pretrain/checkpoints" ] || dppo pretrain task=lift dataset=$OUT/demos \
  out=$OUT/pretrain train.steps=$PRETRAIN_STEPS train.seed=$SEED train.eval_every=0 \
  final_eval_episodes=0
[ -f "$OUT/eval-pretrained/eval.json" ] || dppo eval checkpoint=$OUT/pretrain \
  n_episodes=$EVAL_EPISODES out=$OUT/eval-pretrained
[ -d "$OUT/play" ] || dppo collect-play task=lift n_steps=$PLAY_STEPS seed=$SEED out=$OUT/play
[ -f "$OUT/world_model/summary.json" ] || dppo train-world-model task=lift dataset=$OUT/play \
  out=$OUT/world_model train.seed=$SEED
dppo finetune-offline task=lift algorithm=dppo_robomimic checkpoint=$OUT/pretrain \
  world_model=$OUT/world_model out=$OUT/finetune seed=$SEED algorithm.iterations=$ITERATIONS \
  eval_every=10 eval_episodes=50
dppo eval checkpoint=$OUT/finetune n_episodes=$EVAL_EPISODES out=$OUT/eval-finetuned
python "$(dirname "$0")/offline_summary.py" "$OUT"
