#!/bin/bash
# ctm_digits and ctm_digits_gan: train, trajectory checks, FD-digits sweeps at gamma 0 and 1, one NFE table.
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
T=${TEACHER:-runs/edm_digits}
for run in ctm_digits ctm_digits_gan; do
  start=$(date +%s); echo "$run start $(date)"
  .venv/bin/cmgen train $run method.teacher=$T train.threads=1 --out runs/$run --no-progress
  echo "$run trained in $(( $(date +%s) - start )) s"
  .venv/bin/python benchmarks/ctm_checks.py runs/$run --n 100 --fine 100 --threads 1 --cache runs/ctm_checks_cache
  .venv/bin/cmgen eval sweep runs/$run --steps 1,2,4,8 --ref holdout --n 1000 --threads 1 --no-progress
  .venv/bin/cmgen eval sweep runs/$run --steps 1,2,4,8 --ref holdout --n 1000 --threads 1 --no-progress --sampler multistep
done
.venv/bin/python benchmarks/ctm_nfe_table.py --out runs/ctm_nfe \
  --sweep "CTM gamma=0=runs/ctm_digits/eval/sweep_FD-digits_step650.json" \
  --sweep "CTM gamma=1=runs/ctm_digits/eval/sweep_FD-digits_multistep_step650.json" \
  --sweep "CTM+GAN gamma=0=runs/ctm_digits_gan/eval/sweep_FD-digits_step700.json" \
  --sweep "CTM+GAN gamma=1=runs/ctm_digits_gan/eval/sweep_FD-digits_multistep_step700.json" \
  --teacher $T/eval/sweep_FD-digits_step3000.json --point "iCT ict_digits (README)=1:3.496,2:1.9"
echo "all done $(date)"
