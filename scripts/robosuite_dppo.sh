#!/usr/bin/env bash
# robosuite (lift | can | square): 200 scripted demos -> imitation -> DPPO with the robomimic
# settings -> summaries. Usage: scripts/robosuite_dppo.sh TASK [OUT_DIR] [ITERATIONS]
set -euo pipefail
task=${1:?task: lift, can or square}
out=${2:-runs/$task}
iterations=${3:-20}
[ -d "$out/demos" ] || dppo demos task="$task" n_episodes=200 out="$out/demos"
[ -f "$out/pretrain/summary.json" ] || dppo pretrain task="$task" dataset="$out/demos" \
  out="$out/pretrain" train.steps=6000 train.eval_every=0 final_eval_episodes=50
dppo finetune task="$task" algorithm=dppo_robomimic checkpoint="$out/pretrain" \
  out="$out/finetune" iterations="$iterations" eval_every=5 eval_episodes=50 eval_n_envs=10
