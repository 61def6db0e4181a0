#!/bin/bash
# The RG-LCD digits table over training seeds (SEEDS, default "0 1 2"): per seed, plain LCD (beta 0), direct
# RG-LCD at beta 0.5 and 1, LRM RG-LCD at beta 0.5 and 1 (beta 0 is plain LCD bit for bit), then
# benchmarks/rglcd_digits.py (rewards with paired 95% CIs against that seed's LCD, FD-digits, the LRM's held-out
# agreement, grids beside the teacher's 50-step DDIM), and finally the mean ± std over seeds (seeds.md).
# Needs runs/latents_digits; trains the ldm_digits teacher once if it is missing. One thread per run; run it
# alone on the machine: bash benchmarks/rglcd_digits.sh
set -eux
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SEEDS=${SEEDS:-0 1 2}
T() { /usr/bin/time -f "$1 wall %e s" cmgen train "${@:2}" --no-progress; }
ls runs/ldm_digits/checkpoints/step-00002000 >/dev/null 2>&1 || { rm -rf runs/ldm_digits; T ldm ldm_digits --out runs/ldm_digits; }
for S in $SEEDS; do
  T lcd_s$S lcd_digits train.seed=$S --out runs/lcd_digits_s$S
  for B in 05 1; do
    T rglcd_b${B}_s$S rglcd_digits method.reward_scale=${B/05/0.5} train.seed=$S --out runs/rglcd_digits_b${B}_s$S
    T lrm_b${B}_s$S rglcd_digits_lrm method.reward_scale=${B/05/0.5} train.seed=$S --out runs/rglcd_digits_lrm_b${B}_s$S
  done
  python benchmarks/rglcd_digits.py --lcd runs/lcd_digits_s$S --teacher runs/ldm_digits --n 1000 \
    --runs runs/rglcd_digits_b05_s$S runs/rglcd_digits_b1_s$S runs/rglcd_digits_lrm_b05_s$S runs/rglcd_digits_lrm_b1_s$S \
    --out runs/rglcd_table_s$S
done
python benchmarks/rglcd_digits.py aggregate runs/rglcd_seeds $(for S in $SEEDS; do echo runs/rglcd_table_s$S/table.json; done)
