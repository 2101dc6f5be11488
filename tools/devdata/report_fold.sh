#!/usr/bin/env bash
# docs/QUALITY.md's round-3 measurement, from the command line with default options, on one
# fold (the rule fixed beforehand). Folds come from make_folds.py; the anchor is fitted on the
# other fold's real crops, the bundled extra crops and tools/devdata's real_extra photos.
#
#   tools/devdata/report_fold.sh EVAL DEVDATA OUT [FOLD]
#
# EVAL: make_folds.py's --out folder; DEVDATA: tools/devdata's output; FOLD: report (default)
# or tune. Then: python tools/devdata/report_tables.py EVAL OUT [FOLD] prints the tables.
set -euo pipefail
eval_dir=$1 devdata=$2 out=$3 fold=${4:-report}
other=$([ "$fold" = report ] && echo tune || echo report)
runner=(--runner FnApiRunner)
anchor=$out/anchor.safetensors
mkdir -p "$out"
step() { echo "== $(date +%T) $*" >&2; }

step fit on the $other fold\'s reals
anchorscan fit --input "$eval_dir/${other}_real.txt" --input demo/data/fit/extra --input "$devdata/real_extra" \
    --anchor "$anchor" --calibration_fraction 0.25 --calibration_group '([^/]+)__x' "${runner[@]}"

# every family and the fold's reals, PNG and re-encoded as JPEG q90; the near-real negatives
# (real photos after processing) in the same manifest, rows of their own
cat "$eval_dir/$fold.csv" > "$out/labels.csv"
tail -n +2 "$eval_dir/${fold}_processed.csv" >> "$out/labels.csv"
step evaluate the default score
anchorscan evaluate "$out/labels.csv" --dataset manifest --anchor "$anchor" --output "$out/default" \
    --sweep jpeg:90 "${runner[@]}"

step soft real photos
{ echo uri,label,generator; sed 's/$/,real,clean/' "$eval_dir/${fold}_real.txt"; } > "$out/reals.csv"
anchorscan evaluate "$out/reals.csv" --dataset manifest --anchor "$anchor" --output "$out/soft" \
    --sweep blur:0.3,blur:0.45,blur:0.6,blur:0.8,blur:1.0,blur:1.2,defocus:1,defocus:1.5,defocus:2.5,motion:3,motion:5,motion:9,thumbnail:0.8,thumbnail:0.625,thumbnail:0.5 \
    "${runner[@]}"

step the LDA probe on every channel, fitted on the $other fold\'s labelled images
anchorscan fit-head --kind lda --features all --real "$eval_dir/${other}_real.txt" --fake "$eval_dir/${other}_fakes.txt" \
    --output "$out/lda.safetensors" "${runner[@]}"
anchorscan evaluate "$eval_dir/$fold.csv" --dataset manifest --anchor "$anchor" --head "$out/lda.safetensors" \
    --output "$out/lda" "${runner[@]}"
step done
