#!/bin/bash
# Option (a) of the CTM digits criteria in one command, for a GPU machine: a wider EDM teacher and its CTM
# student trained at the paper's batch for many more steps than the CPU recipe, then the trajectory checks at
# every checkpoint, FD-digits sweeps at gamma 0 and 1, and the NFE table.
#
#   benchmarks/ctm_digits_gpu.sh                  # defaults below; OUT=runs/ctm_gpu
#   WIDTH=[128,256] STEPS=32000 benchmarks/ctm_digits_gpu.sh
#   CHUNK=3000 benchmarks/ctm_digits_gpu.sh       # at most 3000 training steps per call: call it again to go on
#   SMOKE=1 benchmarks/ctm_digits_gpu.sh          # a few steps of everything on the CPU (checks the script)
#
# Every call resumes where the last one stopped (a finished phase is skipped), so the work fits machines
# whose commands are cut off after a few minutes. Exit status 3: stopped after CHUNK steps, call again.
# Student settings: the paper's K = N - 1, theta⁻ 0.999, RAdam 4e-4, batch 256; the digits recipe's grid,
# L2 distance and DSM term. Every number is a recipe override, so the run folders' recipe.yaml record them.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
CMGEN=${CMGEN:-.venv/bin/cmgen}
OUT=${OUT:-runs/ctm_gpu}
WIDTH=${WIDTH:-[64,128]}
NORM_GROUPS=${NORM_GROUPS:-32}
BATCH=${BATCH:-256}
TEACHER_STEPS=${TEACHER_STEPS:-20000}
STEPS=${STEPS:-16000}
MP=${MP:-bf16}
N=${N:-1000}
CHECK_N=${CHECK_N:-100}
CHUNK=${CHUNK:-0}
if [ "${SMOKE:-0}" = 1 ]; then
  WIDTH=[16,32]; NORM_GROUPS=8; BATCH=8; TEACHER_STEPS=4; STEPS=4; MP=no; N=20; CHECK_N=8
fi
EVERY=$(( STEPS / 8 > 0 ? STEPS / 8 : 1 ))
EVERY_T=$(( TEACHER_STEPS / 4 > 0 ? TEACHER_STEPS / 4 : 1 ))
WIDE="model.block_out_channels=$WIDTH model.norm_num_groups=$NORM_GROUPS"

train() {  # RECIPE OUT STEPS OVERRIDES...: OUT resumed if it has checkpoints; at most CHUNK steps a call
  local recipe=$1 out=$2 steps=$3; shift 3
  local last; last=$out/checkpoints/step-$(printf %08d "$steps")
  [ -d "$last" ] && { echo "$out: trained to step $steps already"; return 0; }
  local extra=(); [ -d "$out/checkpoints" ] && extra+=(--resume auto)
  [ "$CHUNK" -gt 0 ] && extra+=(--stop-after "$CHUNK")
  local start; start=$(date +%s)
  $CMGEN train "$recipe" "$@" train.steps="$steps" --out "$out" --no-progress "${extra[@]}"
  echo "$out: $(( $(date +%s) - start )) s this call"
  [ -d "$last" ] || { echo "$out: stopped before step $steps; call this script again to go on"; exit 3; }
}

train edm_digits $OUT/edm $TEACHER_STEPS $WIDE train.batch_size=$BATCH train.mixed_precision=$MP \
  optim.warmup_steps=$(( TEACHER_STEPS / 15 )) train.checkpoint_every=$EVERY_T train.sample_every=0
[ -f $OUT/edm/eval/sweep_FD-digits_step$TEACHER_STEPS.json ] ||
  $CMGEN eval sweep $OUT/edm --steps 8,18,32 --ref holdout --n $N --no-progress
train ctm_digits $OUT/ctm $STEPS method.teacher=$OUT/edm $WIDE method.max_k=16 method.target_decay=0.999 \
  train.batch_size=$BATCH train.ema_decay=0.999 train.mixed_precision=$MP optim.lr=4e-4 \
  train.checkpoint_every=$EVERY train.keep_last=8 train.sample_every=$EVERY
$PY benchmarks/ctm_checks.py $OUT/ctm --n $CHECK_N --fine 100 --every-checkpoint --cache $OUT/checks_cache
$CMGEN eval sweep $OUT/ctm --steps 1,2,4,8 --ref holdout --n $N --no-progress
$CMGEN eval sweep $OUT/ctm --steps 1,2,4,8 --ref holdout --n $N --no-progress --sampler multistep
$PY benchmarks/ctm_nfe_table.py --out $OUT/ctm_nfe \
  --sweep "CTM gamma=0=$OUT/ctm/eval/sweep_FD-digits_step$STEPS.json" \
  --sweep "CTM gamma=1=$OUT/ctm/eval/sweep_FD-digits_multistep_step$STEPS.json" \
  --teacher $OUT/edm/eval/sweep_FD-digits_step$TEACHER_STEPS.json
echo "all done $(date): $OUT/ctm/eval/ctm_checks_curve.png, $OUT/ctm_nfe.md"
