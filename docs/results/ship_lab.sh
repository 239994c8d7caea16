#!/usr/bin/env bash
# Ship a trained lab as the package's teaching lab, and re-run every bench and notebook that quotes the lab's
# numbers, in one resumable background job (~1.5 hours on 2 cores), so the session that ships spends its time on the
# prose rather than waiting:
#
#     nohup bash docs/results/ship_lab.sh runs/fs4h_c3518/lab > runs/ship.log 2>&1 &
#
# It writes into the package by name: the lab's files over sdipc_lab/toyworld/lab/ (whole or not at all; git holds
# the lab it replaces), notebook 08's latent and pixel towers (they belong to the lab's text tower), notebook 06's
# long fine-tuning curve, the README's contact sheets. Everything else goes to OUT (default runs/ship): each step's
# printed table as STEP.txt, the executed notebooks, the quality JSON. A step whose output exists is skipped, so the
# same command goes on after an interruption; OUT records the lab it ships and refuses another one (start a new OUT).
# What it does not do: the numbers quoted in the notebooks' prose, docs/results/*.md and the README's provenance,
# which are rewritten by hand from OUT's tables (the progress doc lists the cells).
# UNTIL=STEP stops after that step; PACKAGE_LAB=DIR ships into another folder (the tests use both).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# = 1 ] || { echo "usage: bash $0 LAB_DIR   (an exported lab: the folder \`train export --lab-dir\` wrote)" >&2; exit 2; }
LAB=${1%/}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-runs/ship} PACKAGE_LAB=${PACKAGE_LAB:-sdipc_lab/toyworld/lab} UNTIL=${UNTIL:-}
for part in sdipc_lab.json unet text_encoder image_encoder tokenizer vae scheduler; do
  [ -e "$LAB/$part" ] || { echo "$LAB is not an exported lab (no $part): give the folder \`train export" \
                                "--lab-dir\` wrote, e.g. runs/fs4h_c3518/lab" >&2; exit 2; }
done
SOURCE=$(cd "$LAB" && pwd)
mkdir -p "$OUT"
if [ -f "$OUT/source.txt" ] && [ "$(cat "$OUT/source.txt")" != "$SOURCE" ]; then
  echo "$OUT is shipping $(cat "$OUT/source.txt"), not $SOURCE: give another OUT=... (or remove $OUT)" >&2; exit 2
fi
echo "$SOURCE" > "$OUT/source.txt"

# step NAME COMMAND...: run once; its printed output becomes OUT/NAME.txt only when it succeeds
step() {
  local name=$1; shift
  if [ ! -f "$OUT/$name.txt" ]; then
    echo "=== $(date -u +%FT%TZ) $name: $*"
    "$@" | tee "$OUT/$name.txt.tmp"
    mv "$OUT/$name.txt.tmp" "$OUT/$name.txt"
  fi
  if [ "$UNTIL" = "$name" ]; then echo "stopped after $name (UNTIL)"; exit 0; fi
}
copy_lab() {
  rm -rf "$PACKAGE_LAB.new"; cp -r "$LAB" "$PACKAGE_LAB.new"
  rm -rf "$PACKAGE_LAB.old"; [ -d "$PACKAGE_LAB" ] && mv "$PACKAGE_LAB" "$PACKAGE_LAB.old"
  mv "$PACKAGE_LAB.new" "$PACKAGE_LAB"; rm -rf "$PACKAGE_LAB.old"
  echo "shipped $SOURCE as $PACKAGE_LAB ($(du -sh "$PACKAGE_LAB" | cut -f1))"
}

step lab copy_lab
step latent_clip $PY -m sdipc_lab.latent_clip train --lab toy --steps 1000 --export toy --out "$OUT/latent_clip"
step quality $PY bench/toyworld_quality.py --n 96
step curve $PY bench/toyworld_quality.py --n 96 --curve --json "$OUT/curve.json"
step masking $PY bench/masking.py toy --n 96 --padding
step finetune $PY bench/finetune.py --save sdipc_lab/toyworld/fidelity_curve.json
step latent_reward $PY bench/latent_reward.py
step contact_sheet $PY bench/contact_sheet.py
step notebooks $PY bench/notebooks_time.py --executed "$OUT/executed"
step solutions $PY bench/notebooks_time.py notebooks/solutions/*.ipynb --executed "$OUT/executed/solutions"
echo "=== $(date -u +%FT%TZ) shipped $SOURCE: every step's table is in $OUT/; now the prose (progress doc)"
