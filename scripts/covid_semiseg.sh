#!/usr/bin/env bash
# Train the COVID-SemiSeg recipe (docs/BENCHMARKS.md, "COVID-SemiSeg recipe") on its 50 doctor-labelled slices.
#
#   bash scripts/covid_semiseg.sh TRAIN_DIR OUT_DIR
#
# TRAIN_DIR: COVID-SemiSeg's folder (TrainingSet/LungInfection-Train/Doctor-label/{Imgs,GT} under it), or any
# folder of image-mask pairs train.py reads. The recipe is a 5-fold cross-validation; its five final fold models
# are the ensemble to use, left as OUT_DIR/fold0.pth .. fold4.pth:
#
#   python infer.py --checkpoint OUT_DIR/*.pth --input IMGS_DIR --output PRED_DIR --save-probs PROB_DIR
#
# (probabilities averaged over the five models, each with flip test-time augmentation, recorded in the
# checkpoints). OUT_DIR/cv/cv.json holds the cross-validated Dice; OUT_DIR/cv/fold<i>/ each fold's run.
# Uses .venv (made by `make install` if missing) unless PYTHON names another interpreter.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash scripts/covid_semiseg.sh TRAIN_DIR OUT_DIR [train.py flags, e.g. --device cuda]" >&2
    exit 2
fi
TRAIN_DIR=$1
OUT_DIR=$2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    make -s -C "$ROOT" install
    PYTHON=$ROOT/.venv/bin/python
fi
EPOCHS=${EPOCHS:-250}  # the recipe's; fewer for a quick try (the tests use 1)

"$PYTHON" "$ROOT/train.py" --data "$TRAIN_DIR" --out "$OUT_DIR/cv" --folds 5 --seed 0 \
    --model unet --width 16 --size 256 --loss bce_dice --no-batch-dice --epochs "$EPOCHS" --batch-size 8 \
    --augment basic --opt adamw --lr 2e-3 --weight-decay 1e-4 --sched onecycle --tta --no-progress "${@:3}"

# the ensemble: every fold's final model (written to a temporary name, then renamed)
for fold in "$OUT_DIR"/cv/fold*/; do
    name=$(basename "$fold")
    cp "$fold/last.pth" "$OUT_DIR/.$name.pth.tmp"
    mv "$OUT_DIR/.$name.pth.tmp" "$OUT_DIR/$name.pth"
done
echo "models: $(ls "$OUT_DIR"/*.pth | tr '\n' ' ')"
echo "use:    python infer.py --checkpoint $OUT_DIR/*.pth --input IMGS_DIR --output PRED_DIR --save-probs PROB_DIR"
