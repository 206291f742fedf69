#!/usr/bin/env bash
# Run every stage of examples/<name>.yaml (prepare, train-teacher, precompute, distill, the labels-only
# baseline, evaluate), timing each; outputs under runs/<name>/, stage times in runs/<name>/times.txt.
# A file without a train_teacher: section (examples/lm.yaml: the teacher is used as is) skips train-teacher.
# Usage: bash examples/run.sh ner_wnut16 [pos_wsj sts_lee lm ...]   (from the repository root)
set -euo pipefail
KD=${KD:-.venv/bin/kd}
for name in "$@"; do
  P=examples/$name.yaml
  R=runs/$name
  rm -rf "$R" && mkdir -p "$R"
  stage() {
    local label=$1; shift
    local start=$SECONDS
    "$KD" "$@" --params "$P" > "$R/$label.log" 2>&1 || { echo "$label failed: see $R/$label.log" >&2; exit 1; }
    echo "$label $((SECONDS - start)) s" | tee -a "$R/times.txt"
  }
  stage prepare prepare
  if grep -q '^train_teacher:' "$P"; then stage train_teacher train-teacher; fi
  stage precompute precompute
  stage distill distill
  stage baseline distill --set distill.teacher_signal=none --set "distill.output=$R/models/baseline" \
    --set "distill.metrics=$R/metrics/baseline.json" --set "distill.log_dir=$R/dvclive/baseline"
  stage evaluate evaluate
  cat "$R/metrics/evaluate.json"
done
