#!/usr/bin/env bash
# Train the COVID-SemiSeg recipe (docs/BENCHMARKS.md, "COVID-SemiSeg recipe") on its 50 doctor-labelled slices.
#
#   bash scripts/covid_semiseg.sh TRAIN_DIR OUT_DIR
#   bash scripts/covid_semiseg.sh TRAIN_DIR OUT_DIR --task lesion-types   # ground-glass opacity / consolidation
#   bash scripts/covid_semiseg.sh TRAIN_DIR OUT_DIR --unlabeled UNLABELED_DIR   # semi-supervised
#   bash scripts/covid_semiseg.sh TRAIN_DIR OUT_DIR --unlabeled UNLABELED_DIR --semi mean-teacher
#
# --unlabeled UNLABELED_DIR: slices without masks (COVID-SemiSeg's TrainingSet/LungInfection-Train/Unlabeled).
# Alone, it is the semi-supervised recipe (docs/BENCHMARKS.md, "every recipe at a glance"): the U-Net is first
# pretrained on those slices by restoration, once for all folds (`pretrain.py --width 16 --epochs 10`, into
# OUT_DIR/pretrained; PRETRAIN_EPOCHS sets the epochs), and every fold starts from it (train.py
# --backbone-weights). A rerun reuses a finished pretraining with the same data and settings and refuses any
# other (remove OUT_DIR/pretrained to pretrain anew). With any of train.py's in-training semi-supervised flags
# (--semi, --teacher, --unlabeled-weight, --unlabeled-batch-size, --ema-decay, --confidence), each fold instead
# learns from UNLABELED_DIR as it trains (train.py --unlabeled: a mean teacher by default). Either way the
# labelled files are never read as unlabelled, so no fold's validation slice is trained on.
# `--backbone-weights PRE/encoder.pth` starts every fold from a pretraining of your own.
#
# TRAIN_DIR: COVID-SemiSeg's folder (TrainingSet/LungInfection-Train/Doctor-label/{Imgs,GT} under it), or any
# folder of image-mask pairs train.py reads; with --task lesion-types, COVID-SemiSeg's multi-class masks
# (TrainingSet/MultiClassInfection-Train/GT, paired with Doctor-label/Imgs) or any folder of label masks
# (0/1/2). The recipe is a 5-fold cross-validation; its five final fold models are the ensemble to use,
# left as OUT_DIR/fold0.pth .. fold4.pth (listed in OUT_DIR/models.txt):
#
#   python infer.py --checkpoint OUT_DIR/*.pth --input IMGS_DIR --output PRED_DIR --save-probs PROB_DIR
#
# (probabilities averaged over the five models, each with flip test-time augmentation, recorded in the
# checkpoints). OUT_DIR/cv/cv.json holds the cross-validated Dice; OUT_DIR/cv/fold<i>/ each fold's run. An
# interrupted run continues with the same command and `--resume OUT_DIR/cv`: finished folds are kept, the
# others resume from their last.pth or start (a finished pretraining is reused either way).
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
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-10}  # with --unlabeled alone

# OUT_DIR/models.txt lists the fold models this script copied there. A rerun replaces only those: any other
# .pth in OUT_DIR would be averaged in by `--checkpoint OUT_DIR/*.pth`, so it is refused, never deleted.
MANIFEST=$OUT_DIR/models.txt
listed() { [ -f "$MANIFEST" ] && grep -qxF "$1" "$MANIFEST"; }
for model in "$OUT_DIR"/*.pth; do
    [ -e "$model" ] || continue
    if ! listed "$(basename "$model")"; then
        echo "error: $model: not written by this script (not listed in $MANIFEST), and \`--checkpoint $OUT_DIR/*.pth\`" \
             "would average it into the ensemble; move it away or choose another OUT_DIR" >&2
        exit 1
    fi
done

# The loss: train.py's default (bce_dice) for the lesion task; for a types task (--task *-types) the types
# recipe adds ce_dice_union (the binary recipe's loss on the union of the types, beside ce_dice) and
# cross-entropy weights from the class frequencies (docs/BENCHMARKS.md, "Ground-glass and consolidation").
# Flags given after OUT_DIR come later on the command line, so they win. --unlabeled DIR is held back from
# train.py when the script pretrains on DIR; the flags pretrain.py shares with train.py go to both.
TASK=lesion
UNLABELED=
IN_TRAINING=   # one of train.py's in-training semi-supervised flags, if given
BACKBONE=
PRETRAIN_FLAGS=()
TRAIN_FLAGS=()
ARGS=("${@:3}")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    arg=${ARGS[i]}
    name=${arg%%=*}
    if [[ $arg == *=* ]]; then value=${arg#*=}; else value=${ARGS[i + 1]:-}; fi
    case $name in
        --task) TASK=$value ;;
        --semi | --teacher | --unlabeled-weight | --unlabeled-batch-size | --ema-decay | --confidence) IN_TRAINING=$name ;;
        --backbone-weights) BACKBONE=$value ;;
        --model | --width | --size | --seed | --device | --amp | --workers) PRETRAIN_FLAGS+=("$name" "$value") ;;
        --deterministic | --channels-last | --no-channels-last) PRETRAIN_FLAGS+=("$arg") ;;
        --unlabeled)
            if [ -z "$value" ] || [[ $value == --* ]]; then
                echo "error: --unlabeled needs the folder of slices without masks" >&2
                exit 2
            fi
            UNLABELED=$value
            [[ $arg == *=* ]] || ((i += 1))
            continue ;;
    esac
    TRAIN_FLAGS+=("$arg")
done
PRETRAINED=()
if [ -n "$UNLABELED" ] && [ -n "$IN_TRAINING" ]; then
    TRAIN_FLAGS+=(--unlabeled "$UNLABELED")
elif [ -n "$UNLABELED" ]; then
    if [ -n "$BACKBONE" ]; then
        echo "error: --unlabeled pretrains on $UNLABELED and --backbone-weights starts from $BACKBONE: give one" \
             "(or --semi with both, for train.py's in-training method from pretrained weights)" >&2
        exit 2
    fi
    "$PYTHON" "$ROOT/pretrain.py" --data "$TRAIN_DIR" --unlabeled "$UNLABELED" --out "$OUT_DIR/pretrained" \
        --model unet --width 16 --size 256 --epochs "$PRETRAIN_EPOCHS" --reuse --no-progress "${PRETRAIN_FLAGS[@]}" \
        || { status=$?
             if [ -f "$OUT_DIR/pretrained/encoder.pth" ]; then
                 echo "(remove $OUT_DIR/pretrained to pretrain anew)" >&2
             fi
             exit $status; }
    PRETRAINED=(--backbone-weights "$OUT_DIR/pretrained/encoder.pth")
fi
TYPES_RECIPE=()
case $TASK in *-types) TYPES_RECIPE=(--loss ce_dice_union --class-weights auto) ;; esac
"$PYTHON" "$ROOT/train.py" --data "$TRAIN_DIR" --out "$OUT_DIR/cv" --folds 5 --seed 0 \
    --model unet --width 16 --size 256 --no-batch-dice --epochs "$EPOCHS" --batch-size 8 \
    --augment basic --opt adamw --lr 2e-3 --weight-decay 1e-4 --sched onecycle --tta --no-progress \
    "${TYPES_RECIPE[@]}" "${PRETRAINED[@]}" "${TRAIN_FLAGS[@]}"

# the ensemble: this run's fold models only (cv.json says how many; OUT_DIR/cv may still hold folders of an
# earlier run with more folds), each written to a temporary name, then renamed
FOLDS=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["folds"])' "$OUT_DIR/cv/cv.json")
NEW=$(for ((i = 0; i < FOLDS; i++)); do echo "fold$i.pth"; done)
write_manifest() {  # the names in $1, atomically
    printf '%s\n' $1 > "$OUT_DIR/.models.txt.tmp"
    mv "$OUT_DIR/.models.txt.tmp" "$MANIFEST"
}
OLD=$([ -f "$MANIFEST" ] && cat "$MANIFEST" || true)
write_manifest "$(printf '%s\n' $OLD $NEW | sort -u)"  # a crash below leaves every model listed
for ((i = 0; i < FOLDS; i++)); do
    cp "$OUT_DIR/cv/fold$i/last.pth" "$OUT_DIR/.fold$i.pth.tmp"
    mv "$OUT_DIR/.fold$i.pth.tmp" "$OUT_DIR/fold$i.pth"
done
for name in $OLD; do  # an earlier run's folds beyond this run's
    if ! grep -qxF "$name" <<< "$NEW"; then
        rm -f "$OUT_DIR/$name"
    fi
done
write_manifest "$NEW"
echo "models: $(ls "$OUT_DIR"/*.pth | tr '\n' ' ')"
echo "use:    python infer.py --checkpoint $OUT_DIR/*.pth --input IMGS_DIR --output PRED_DIR --save-probs PROB_DIR"
