#!/usr/bin/env bash
# docs/QUALITY.md, *Near-duplicates in the hold-out*: the same fit corpus, full of near-duplicates
# (the tune fold's real crops and their re-encodes, resizes and watermarks), held out by URI and
# by perceptual hash; each anchor then scores the report fold's real crops and their processed
# copies, none of which it has seen, and evaluate gives the share flagged.
#
#   tools/devdata/holdout_keys.sh EVAL OUT
set -euo pipefail
eval_dir=$1 out=$2
runner=(--runner FnApiRunner)
mkdir -p "$out"
{ echo uri,label,generator; sed 's/$/,real,clean/' "$eval_dir/report_real.txt"; tail -n +2 "$eval_dir/report_processed.csv"; } \
    > "$out/unseen.csv"
for key in uri phash; do
    echo "== $(date +%T) hold-out by $key" >&2
    anchorscan fit --input "$eval_dir/tune_real.txt" --input "$eval_dir/tune_processed.csv" --input demo/data/fit/extra \
        --anchor "$out/$key.safetensors" --calibration_fraction 0.25 --calibration_key "$key" "${runner[@]}"
    anchorscan evaluate "$out/unseen.csv" --dataset manifest --anchor "$out/$key.safetensors" --output "$out/$key" \
        "${runner[@]}"
done
