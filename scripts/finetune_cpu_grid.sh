#!/usr/bin/env bash
# Every method from the same launcher on CPU: stories260K (TinyStories) fine-tuned
# on TinyShakespeare (first 90 % trains, last 10 % held out), 100 steps, seq 64.
# Writes experiments/results/finetune_cpu/<method>.json (see WORKSPACE.md, section 5).
set -euo pipefail
cd "$(dirname "$0")/.."
out=experiments/results/finetune_cpu
mkdir -p "$out"
for m in full lora qlora modulora apiq loftq peqa qft hift; do
  opt=adamw; lr=3e-3
  if [ "$m" = qft ]; then opt=lion_int8; lr=3e-4; fi
  JAX_PLATFORMS=cpu python experiments/finetune.py --config.method.name=$m \
    --config.optimizer=$opt --config.learning_rate=$lr --config.steps=100 \
    --config.data.seq_len=64 --config.method.calib_segments=8 \
    --config.method.calib_seq_len=64 --config.eval_interval=1000 \
    --config.workdir=runs/finetune_cpu/$m --output_json=$out/$m.json
done
