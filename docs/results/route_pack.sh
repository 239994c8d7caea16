#!/usr/bin/env bash
# Keep fs4_route.sh's finished stages when runs/ is lost. runs/ is not committed (caption states and optimizer
# checkpoints run to gigabytes) and a new checkout starts without it, while the route (~9.5 hours) is longer than a
# working session. So a session that gets past a stage boundary saves what the stages after it start from (exported
# labs and the text tower: a few MB each, no optimizer state) into a committed folder, and a later session restores
# it before running the route again, with the route's own variables:
#
#     TOWER_STEPS=1555 BTAG=_t3068 TOWER3_STEPS=450 TAG=_c3518 bash docs/results/route_pack.sh save docs/results/labs/route_c3518
#     bash docs/results/route_pack.sh restore docs/results/labs/route_c3518    # then the route's command, as before
#
# Boundaries saved: (1) phase 1 and the text tower finished (runs/fs2/peek4000, phase 2's start, and the tower the
# U-Net trains under); (2) phase 2 finished (its exported lab, which the one-object stage starts from). The stages
# after that continue from checkpoints with optimizer state and are not saved. The pack mirrors runs/, with the
# stages' .done markers, so the route skips what it holds; restore never overwrites anything runs/ has. The labs
# are exported ones (U-Net in fp16), as the route itself hands them on, so a restored route trains as the
# uninterrupted one did. RUNS=DIR works on another folder than runs/ (the tests use it).
# save replaces only a pack: a folder holding its marker (MARKER, written first into each pack) or shaped like one
# (fs2/peek4000, and only the run folders a pack holds: the packs in docs/results/labs/ carry no marker); any other
# folder given as PACK_DIR, or found at PACK_DIR.tmp / PACK_DIR.old, is left alone and the save refused.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs}
MARKER=route_pack.txt
usage() { echo "usage: [route variables] bash $0 save|restore PACK_DIR" >&2; exit 2; }
[ $# = 2 ] || usage
ACTION=$1 PACK=${2%/}
case $ACTION in
  save|restore) ;;
  *) echo "$ACTION is not an action of route_pack.sh: give save or restore" >&2; usage;;
esac

# is_pack DIR: DIR is a pack this script wrote (its marker), or one without the marker (by its shape)
is_pack() {
  [ -d "$1" ] && [ ! -L "$1" ] || return 1
  [ -f "$1/$MARKER" ] && return 0
  [ -d "$1/fs2/peek4000" ] || return 1
  local entry
  for entry in "$1"/* "$1"/.[!.]*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case ${entry##*/} in fs2|clipA|clipB*|clipC*|fs4b*) [ -d "$entry" ] || return 1;; *) return 1;; esac
  done
}

if [ "$ACTION" = restore ]; then
  [ -d "$PACK/fs2/peek4000" ] || { echo "$PACK is not a route pack (no fs2/peek4000): nothing restored" >&2; exit 2; }
  mkdir -p "$RUNS"
  for entry in "$PACK"/* "$PACK"/.[!.]*; do  # the pack's run folders; its marker stays in the pack
    [ -e "$entry" ] && [ "${entry##*/}" != "$MARKER" ] || continue
    cp -rn "$entry" "$RUNS"/
  done
  echo "restored into $RUNS/: $(cd "$PACK" && find . -name '*.done' | sort | tr '\n' ' ')"
  exit 0
fi
for folder in "$PACK" "$PACK.tmp" "$PACK.old"; do
  if { [ -e "$folder" ] || [ -L "$folder" ]; } && ! is_pack "$folder"; then
    echo "$folder exists and is not a route pack this script wrote (no $MARKER): it is left alone. Give another" \
         "PACK_DIR, or move $folder away. Nothing was saved." >&2
    exit 2
  fi
done
[ -d "$(dirname "$PACK")" ] || { echo "$(dirname "$PACK") (where PACK_DIR goes) does not exist" >&2; exit 2; }

TOWER3=${TOWER3_STEPS:-0}
B=clipB${BTAG:-${TAG:-}} C=clipC${TAG:-} P2=fs4b${TAG:-}
TEXT=$B; [ "$TOWER3" != 0 ] && TEXT=$C
if [ ! -f "$RUNS/fs2/peek4000/sdipc_lab.json" ] || [ ! -f "$RUNS/$TEXT/clip.done" ]; then
  echo "nothing to save: $RUNS/ has not reached phase 2's start (fs2/peek4000 and $TEXT/clip.done); give the" \
       "route's variables (TAG, BTAG, TOWER3_STEPS) as you ran it" >&2
  exit 2
fi
rm -rf "$PACK.tmp"; mkdir "$PACK.tmp"  # (a pack's leftover, checked above)
echo "a route pack written by docs/results/route_pack.sh: save replaces this folder whole" > "$PACK.tmp/$MARKER"
mkdir -p "$PACK.tmp/fs2" "$PACK.tmp/clipA" "$PACK.tmp/$B" "$PACK.tmp/$TEXT"
cp -r "$RUNS/fs2/peek4000" "$PACK.tmp/fs2/"
touch "$PACK.tmp/fs2/clip.done" "$PACK.tmp/fs2/phase1.done" "$PACK.tmp/clipA/clip.done" "$PACK.tmp/$B/clip.done"
cp -r "$RUNS/$TEXT"/{tokenizer,text_encoder,image_encoder} "$PACK.tmp/$TEXT/"
touch "$PACK.tmp/$TEXT/clip.done"
saved="phase 2's start"
if [ -f "$RUNS/$P2/unet.done" ] && [ -f "$RUNS/$P2/lab/sdipc_lab.json" ]; then
  mkdir -p "$PACK.tmp/$P2"; cp -r "$RUNS/$P2/lab" "$PACK.tmp/$P2/"; touch "$PACK.tmp/$P2/unet.done"
  saved="$saved and phase 2's end"
fi
rm -rf "$PACK.old"; [ -d "$PACK" ] && mv "$PACK" "$PACK.old"
mv "$PACK.tmp" "$PACK"; rm -rf "$PACK.old"
echo "saved $saved into $PACK ($(du -sh "$PACK" | cut -f1))"
