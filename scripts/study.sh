#!/usr/bin/env bash
# The seed study (docs/results.md): five regimes x three seeds, each 30 steps of 8 prompts x 4
# responses, validated at steps 0, 15 and 30. In the activated environment:
#   bash scripts/study.sh          # seeds 0 1 2
#   bash scripts/study.sh 3 4      # other seeds
# Run it again to go on after an interruption: a finished run (it has metrics.png) is skipped, a
# killed one resumes from its last checkpoint (every 10 steps). Each run goes to
# results/study/<method>_seed<k>/; a finished launch appends its seconds to wall_seconds and a line
# to machine. It ends with the tables (stdout) and docs/figures/study.png.
cd "$(dirname "$0")/.." || exit 1

study() {  # $1: the method's name, then its command
  out=results/study/$1_seed$seed; shift
  [ -e "$out/metrics.png" ] && return  # drawn when a run ends
  if ls "$out"/step_??????/trainer_state.pt >/dev/null 2>&1; then from="--resume $out"
  else from="--overwrite"; fi
  t=$SECONDS
  python "$@" --seed "$seed" --val_every 15 --save_every 10 --out "$out" $from || return
  echo $((SECONDS - t)) >> "$out/wall_seconds"
  echo "$(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(date -u +%F)" >> "$out/machine"
  rm -rf "$out"/step_0000[12]0 "$out/step_000030/trainer_state.pt"  # keeps the final weights
}

for seed in ${*:-0 1 2}; do
  study offline dpo_offline.py
  study semi_online_s10 dpo_semionline.py --sync 10
  study online_s1 dpo_semionline.py --sync 1
  study group_dpo group_dpo.py
  study grpo grpo.py --num_responses 4
done
finished=(results/study/*_seed*/metrics.png)  # the analysis reads the finished runs only
python scripts/study.py "${finished[@]%/metrics.png}" --out docs/figures/study.png
