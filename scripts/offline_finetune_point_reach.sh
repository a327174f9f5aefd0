#!/usr/bin/env bash
# Offline fine-tuning in a learned world model (DiWA-style) on the default task, point_reach:
# demos -> pre-trained policy; play data -> world model + success classifier; DPPO in imagination
# (zero env steps); real evaluation of the pre-trained and the fine-tuned policy (200 episodes each).
#
#   bash scripts/offline_finetune_point_reach.sh [OUT]      (default OUT=runs/offline-point_reach)
#
# Results: $OUT/finetune/summary.json (online_env_steps: 0, play data size, real success per
# evaluation), $OUT/finetune/plots/imagination_vs_reality.png, $OUT/eval-{pretrained,finetuned}.json.
set -euo pipefail
OUT=${1:-runs/offline-point_reach}
SEED=${SEED:-0}

dppo demos task=point_reach n_episodes=100 seed=$SEED out=$OUT/demos
dppo pretrain task=point_reach dataset=$OUT/demos out=$OUT/pretrain train.steps=3000 \
  train.seed=$SEED final_eval_episodes=0
dppo collect-play task=point_reach n_steps=50000 seed=$SEED out=$OUT/play
dppo train-world-model task=point_reach dataset=$OUT/play out=$OUT/world_model train.seed=$SEED
dppo finetune-offline task=point_reach checkpoint=$OUT/pretrain world_model=$OUT/world_model \
  out=$OUT/finetune seed=$SEED algorithm.iterations=30 eval_every=5 eval_episodes=100
dppo eval checkpoint=$OUT/pretrain n_episodes=200 out=$OUT/eval-pretrained
dppo eval checkpoint=$OUT/finetune n_episodes=200 out=$OUT/eval-finetuned
python "$(dirname "$0")/offline_summary.py" "$OUT"
