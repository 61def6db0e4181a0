#!/bin/bash
# The RG-LCD digits table: the ldm_digits teacher, plain LCD, direct RG-LCD at beta 0.5 and 1, LRM RG-LCD at
# beta 0.5 and 1 (beta 0 is plain LCD bit for bit), then benchmarks/rglcd_digits.py (rewards with paired 95%
# CIs against LCD, FD-digits, the LRM's held-out agreement, grids beside the teacher's 50-step DDIM).
# Needs runs/latents_digits. Run it alone on the machine: bash benchmarks/rglcd_digits.sh
set -eux
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
T() { /usr/bin/time -f "$1 wall %e s" cmgen train "${@:2}" --no-progress; }
B() { python benchmarks/rglcd_digits.py --lcd runs/lcd_digits --teacher runs/ldm_digits --n 1000 "$@"; }
ls runs/ldm_digits/checkpoints/step-00002000 >/dev/null 2>&1 || { rm -rf runs/ldm_digits; T ldm ldm_digits --out runs/ldm_digits; }
T lcd lcd_digits --out runs/lcd_digits
T rglcd_b05 rglcd_digits method.reward_scale=0.5 --out runs/rglcd_digits_b05
T rglcd_b1 rglcd_digits method.reward_scale=1.0 --out runs/rglcd_digits_b1
B --runs runs/rglcd_digits_b05 runs/rglcd_digits_b1 --out runs/rglcd_table_direct
T lrm_b05 rglcd_digits_lrm method.reward_scale=0.5 --out runs/rglcd_digits_lrm_b05
T lrm_b1 rglcd_digits_lrm method.reward_scale=1.0 --out runs/rglcd_digits_lrm_b1
B --runs runs/rglcd_digits_b05 runs/rglcd_digits_b1 runs/rglcd_digits_lrm_b05 runs/rglcd_digits_lrm_b1 --out runs/rglcd_table
