#!/usr/bin/env bash
# Hopper-v5 "medium" recipe: Gaussian-PPO expert -> demos -> diffusion pre-training -> DPPO.
# Usage: scripts/hopper_medium.sh [OUT_DIR] [PPO_ITERATIONS]   (each stage is skipped if done)
set -euo pipefail
out=${1:-runs/hopper}
ppo_iterations=${2:-150}
[ -d "$out/ppo/checkpoints/latest" ] || dppo finetune algorithm=ppo_gaussian task=Hopper-v5 \
  out="$out/ppo" iterations="$ppo_iterations" eval_every=25 eval_episodes=10 eval_n_envs=10
[ -d "$out/demos" ] || dppo demos task=Hopper-v5 expert="$out/ppo" n_episodes=50 out="$out/demos"
[ -f "$out/pretrain/summary.json" ] || dppo pretrain task=Hopper-v5 dataset="$out/demos" \
  out="$out/pretrain" train.steps=4000 train.eval_every=0 final_eval_episodes=20
dppo finetune task=Hopper-v5 checkpoint="$out/pretrain" out="$out/finetune" iterations=15 \
  algorithm.n_steps=50 algorithm.batch_size=1000 eval_every=5 eval_episodes=10 eval_n_envs=10
