#!/usr/bin/env bash
# Regenerate every figure of docs/analysis.md from the embedded default model (checkpoints/asff_synthetic.pt)
# on the synthetic validation split, then copy the PNGs shown in the document to docs/figures/.
#
#   bash docs/make_figures.sh                      # all 500 validation images
#   LIMIT=50 bash docs/make_figures.sh             # a quick look
#   SUM_WEIGHTS= bash docs/make_figures.sh         # without the trained sum-fusion model
#   UPDATE=1 bash docs/make_figures.sh             # replace the committed data when they are meant to change
#
# Before copying, the numbers behind the figures (docs/figures/*.csv) are compared with the fresh run
# (docs/check_figure_data.py): a regeneration that no longer matches stops here instead of changing the docs.
#
# Each command writes its figures (PDF + PNG), their data (CSV) and run.json under $OUT/<command>/, and caches
# the model's per-image results there, so running this script again only re-plots.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-data/synthetic}
OUT=${OUT:-runs/analysis}
LIMIT=${LIMIT:-500}                      # figure3 images aside, scale-stats runs on this many images
GRADIENT_LIMIT=${GRADIENT_LIMIT:-200}    # gradflow, compare and evolution (backward passes, several models)
# The training run of the embedded model: its checkpoints when it was trained here, else the logs shipped
# with the model (checkpoints/asff_synthetic_run: scalars, fusion statistics, gradient norms, metrics).
RUN=${RUN:-runs/asff_synthetic}
[ -d "$RUN" ] || RUN=checkpoints/asff_synthetic_run
# The sum-fusion model trained exactly like the embedded default (checkpoints/SUM_MODEL_CARD.md): gradflow and
# compare set the two trained models side by side, next to the uniform-weights counterfactual. An empty
# SUM_WEIGHTS leaves it out.
SUM_WEIGHTS=${SUM_WEIGHTS-checkpoints/sum_synthetic.pt}
DEVICE=${DEVICE:-auto}
WEIGHTS=${WEIGHTS:-checkpoints/asff_synthetic.pt}   # the embedded default model
FIGURES=${FIGURES:-docs/figures}
IMAGES=(000002.jpg 000009.jpg 000032.jpg)  # validation images with small, medium and large objects

if [ -n "$SUM_WEIGHTS" ] && [ ! -f "$SUM_WEIGHTS" ]; then
  echo "$SUM_WEIGHTS is missing: set SUM_WEIGHTS=... to a sum-fusion model, or SUM_WEIGHTS= to leave it out." >&2
  exit 1
fi
if [ ! -f "$WEIGHTS" ]; then
  echo "$WEIGHTS is missing: train or fetch the embedded default model first (or set WEIGHTS=...)." >&2
  exit 1
fi
if [ ! -f "$DATA/annotations/val.json" ]; then
  # The validation split depends only on the seed and the image size, not on the training split's size.
  "$PYTHON" -m asff_viz.data.synthetic --out "$DATA" --seed 0 --train 0 --val 500 --size 320
fi
ANNOTATIONS=$DATA/annotations/val.json
VAL_IMAGES=$DATA/images/val
DATASET=(--annotations "$ANNOTATIONS" --images "$VAL_IMAGES" --limit "$LIMIT")
SUBSET=(--annotations "$ANNOTATIONS" --images "$VAL_IMAGES" --limit "$(( GRADIENT_LIMIT < LIMIT ? GRADIENT_LIMIT : LIMIT ))")
COMMON=(--device "$DEVICE" --no-progress --png-dpi 200)
MODEL=(--weights "$WEIGHTS")
mkdir -p "$FIGURES"

"$PYTHON" -m asff_viz.analyze figure3 "${MODEL[@]}" --images "${IMAGES[@]/#/$VAL_IMAGES/}" --out "$OUT/figure3" \
  "${COMMON[@]}"
"$PYTHON" -m asff_viz.analyze scale-stats "${MODEL[@]}" "${DATASET[@]}" --out "$OUT/scale-stats" "${COMMON[@]}"
GRADFLOW_EXTRA=()
COMPARE_WEIGHTS=(--weights "$WEIGHTS")
COMPARE_LABELS=(--labels "ASFF" "ASFF, uniform weights")
if [ -n "$SUM_WEIGHTS" ]; then
  GRADFLOW_EXTRA=(--sum-weights "$SUM_WEIGHTS")
  COMPARE_WEIGHTS=(--weights "$WEIGHTS" "$SUM_WEIGHTS")
  COMPARE_LABELS=(--labels "ASFF" "sum fusion" "ASFF, uniform weights")
fi
"$PYTHON" -m asff_viz.analyze gradflow "${MODEL[@]}" "${SUBSET[@]}" ${GRADFLOW_EXTRA[@]+"${GRADFLOW_EXTRA[@]}"} \
  --out "$OUT/gradflow" "${COMMON[@]}"
# The threshold sweep behind analysis.md's robustness paragraph (first 100 images, learned and uniform weights).
"$PYTHON" -m asff_viz.analyze gradflow "${MODEL[@]}" --annotations "$ANNOTATIONS" --images "$VAL_IMAGES" \
  --limit "$(( 100 < LIMIT ? 100 : LIMIT ))" --sweep --out "$OUT/gradflow_sweep" "${COMMON[@]}"
"$PYTHON" -m asff_viz.analyze compare "${COMPARE_WEIGHTS[@]}" --counterfactual uniform "${COMPARE_LABELS[@]}" \
  "${SUBSET[@]}" --out "$OUT/compare" "${COMMON[@]}"

# Evolution: every other periodic checkpoint of the run when it kept them (epoch_*.pt), else last/best.
shopt -s nullglob
CHECKPOINTS=("$RUN"/epoch_*[02468].pt)
if [ ${#CHECKPOINTS[@]} -eq 0 ]; then
  for name in last.pt best.pt; do [ -f "$RUN/$name" ] && CHECKPOINTS+=("$RUN/$name"); done
fi
EVOLUTION=(--run "$RUN")
[ ${#CHECKPOINTS[@]} -gt 0 ] && EVOLUTION+=(--checkpoints "${CHECKPOINTS[@]}" "${SUBSET[@]}")
"$PYTHON" -m asff_viz.analyze evolution "${EVOLUTION[@]}" --out "$OUT/evolution" "${COMMON[@]}"

# The committed numbers must be what these commands make here; UPDATE=1 replaces them (after a deliberate change).
if [ "${UPDATE:-0}" != "1" ]; then
  "$PYTHON" docs/check_figure_data.py "$OUT" "$FIGURES" || {
    echo "the regenerated data differ from docs/figures (see above); rerun with UPDATE=1 to replace them" >&2
    exit 1
  }
fi
# Each figure goes with the numbers drawn in it (NAME.csv) and its command's run.json (<command>_run.json).
copy() {
  [ -f "$OUT/$1.png" ] && cp "$OUT/$1.png" "$FIGURES/$2.png" || echo "not made: $OUT/$1.png" >&2
  [ -f "$OUT/$1.csv" ] && cp "$OUT/$1.csv" "$FIGURES/$2.csv"
  local command=${1%%/*}
  [ -f "$OUT/$command/run.json" ] && cp "$OUT/$command/run.json" "$FIGURES/${command//-/_}_run.json"
  return 0
}
copy "figure3/figure3_${IMAGES[0]%.jpg}" figure3_example
copy figure3/figure3_overview figure3_overview
for name in fusion_composition fusion_by_size fusion_by_fine_size fusion_by_class fusion_by_outcome; do
  copy "scale-stats/$name" "$name"
done
for name in gradflow_conflict gradflow_shares gradflow_paths gradflow_conflict_controls; do
  copy "gradflow/$name" "$name"
done
cp "$OUT/scale-stats/fusion_contrasts.csv" "$FIGURES/" && cp "$OUT/scale-stats/run.json" "$FIGURES/scale_stats_run.json"
# The numbers behind the controls figure and how they were made, next to it.
cp "$OUT/gradflow/gradflow_conflict_controls.csv" "$FIGURES/" && cp "$OUT/gradflow/run.json" "$FIGURES/gradflow_run.json"
# ASFF minus the other modes (the uniform re-run, the sum-fusion model), paired over images.
copy gradflow/gradflow_conflict_paired gradflow_conflict_paired
cp "$OUT/gradflow_sweep/gradflow_threshold_sweep.csv" "$FIGURES/" \
  && cp "$OUT/gradflow_sweep/run.json" "$FIGURES/gradflow_sweep_run.json"
for name in compare_ap compare_recall compare_fusion compare_detections; do copy "compare/$name" "$name"; done
cp "$OUT/compare/compare_ap_paired.csv" "$FIGURES/" && cp "$OUT/compare/run.json" "$FIGURES/compare_run.json"
EVOLUTION_FIGURES=(evolution_training_fusion evolution_gradient_norms evolution_metrics)
if [ ${#CHECKPOINTS[@]} -gt 0 ]; then
  EVOLUTION_FIGURES=(evolution_fusion "${EVOLUTION_FIGURES[@]}")
else  # the weights over training need the run's checkpoints, which do not ship (docs/analysis.md, evolution)
  echo "evolution_fusion not drawn: $RUN holds no checkpoints (RUN=runs/asff_synthetic after training)"
fi
for name in "${EVOLUTION_FIGURES[@]}"; do
  copy "evolution/$name" "$name"
done
echo "figures in $FIGURES; full outputs (PDF, CSV, run.json) in $OUT"
