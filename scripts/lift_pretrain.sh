#!/usr/bin/env bash
# robosuite Lift: 200 scripted demos -> imitation pre-training -> 50-episode evaluation.
# Usage: scripts/lift_pretrain.sh [OUT_DIR]   (writes OUT_DIR/{demos,pretrain}, prints eval.json)
set -euo pipefail
out=${1:-runs/lift}
dppo demos task=lift n_episodes=200 out="$out/demos"
dppo pretrain task=lift dataset="$out/demos" out="$out/pretrain" train.steps=6000 \
  train.eval_every=0 final_eval_episodes=50
