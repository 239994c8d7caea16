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
# Nothing but its own output is replaced: PACKAGE_LAB must be missing or a lab holding only a lab's files (as
# `train export` and save_lab write it), and OUT missing, empty, or an OUT of this script (its source.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# = 1 ] || { echo "usage: bash $0 LAB_DIR   (an exported lab: the folder \`train export --lab-dir\` wrote)" >&2; exit 2; }
LAB=${1%/}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-runs/ship} PACKAGE_LAB=${PACKAGE_LAB:-sdipc_lab/toyworld/lab} UNTIL=${UNTIL:-}
PACKAGE_LAB=${PACKAGE_LAB%/}
STEPS="lab latent_clip quality curve masking finetune latent_reward contact_sheet notebooks solutions"
case " $STEPS " in
  *" $UNTIL "*) ;;
  *) [ -z "$UNTIL" ] || { echo "UNTIL=$UNTIL is not a step: give one of $STEPS (or no UNTIL, for all)" >&2; exit 2; };;
esac
LAB_ENTRIES=" sdipc_lab.json constants_measured.json tokenizer text_encoder image_encoder feature_extractor unet vae"
LAB_ENTRIES="$LAB_ENTRIES scheduler "  # what a lab writer puts in a lab folder
for part in sdipc_lab.json unet text_encoder image_encoder tokenizer vae scheduler; do
  [ -e "$LAB/$part" ] || { echo "$LAB is not an exported lab (no $part): give the folder \`train export" \
                                "--lab-dir\` wrote, e.g. runs/fs4h_c3518/lab" >&2; exit 2; }
done
[ -d "$(dirname "$PACKAGE_LAB")" ] || {
  echo "$(dirname "$PACKAGE_LAB") (where PACKAGE_LAB goes) does not exist" >&2; exit 2; }
if [ -e "$PACKAGE_LAB" ] || [ -L "$PACKAGE_LAB" ]; then
  [ -d "$PACKAGE_LAB" ] && [ ! -L "$PACKAGE_LAB" ] && [ -f "$PACKAGE_LAB/sdipc_lab.json" ] || {
    echo "$PACKAGE_LAB exists and is not a lab folder (no sdipc_lab.json): it is left alone; name another" \
         "PACKAGE_LAB" >&2; exit 2; }
  for entry in "$PACKAGE_LAB"/* "$PACKAGE_LAB"/.[!.]*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case $LAB_ENTRIES in *" ${entry##*/} "*) ;; *)
      echo "$PACKAGE_LAB holds ${entry##*/}, which no lab writer wrote: shipping would replace the whole folder" \
           "and lose it. Move it out, or name another PACKAGE_LAB. Nothing was changed." >&2; exit 2;;
    esac
  done
fi
SOURCE=$(cd "$LAB" && pwd)
if [ -d "$OUT" ] && [ ! -f "$OUT/source.txt" ] && [ -n "$(ls -A "$OUT")" ]; then
  echo "$OUT holds files this script did not write (no source.txt): give another OUT=... (a new or empty folder)" >&2
  exit 2
fi
[ ! -e "$OUT" ] || [ -d "$OUT" ] || { echo "$OUT is a file: give OUT=... a folder" >&2; exit 2; }
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
# the new lab is copied into a folder made for this copy (beside PACKAGE_LAB), then swapped in; only that folder
# is ever removed
copy_lab() {
  local stage
  stage=$(mktemp -d "$(dirname "$PACKAGE_LAB")/.$(basename "$PACKAGE_LAB").shipping.XXXXXX")
  cp -r "$LAB" "$stage/new"
  if [ -d "$PACKAGE_LAB" ]; then mv "$PACKAGE_LAB" "$stage/old"; fi
  mv "$stage/new" "$PACKAGE_LAB"; rm -rf "$stage"
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
