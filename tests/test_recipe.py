"""scripts/covid_semiseg.sh: the COVID-SemiSeg recipe's one command, end to end on a tiny pair folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from tests.script_fixtures import REPO, SIZE, export_pairs, processed, run_script  # noqa: F401

SEMISEG = "TrainingSet/LungInfection-Train/Doctor-label"


def run_recipe(*args: str, epochs: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "EPOCHS": str(epochs)}
    return subprocess.run(["bash", "scripts/covid_semiseg.sh", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_recipe_leaves_five_fold_models_that_infer_averages(processed, tmp_path):
    data = tmp_path / "covid-semiseg"
    images = export_pairs(processed, None, data, f"{SEMISEG}/Imgs", f"{SEMISEG}/GT", n=10)
    out = tmp_path / "model"
    proc = run_recipe(str(data), str(out), "--size", str(SIZE), "--width", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    models = sorted(out.glob("*.pth"))
    assert [p.name for p in models] == [f"fold{i}.pth" for i in range(5)]
    for i, path in enumerate(models):
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["args"]["fold"] == i and ckpt["args"]["augment"] == "basic"
        assert ckpt["inference"] == {"tta": True} and ckpt["epoch"] == 0  # the final epoch, not a pick
        assert ckpt["loss"] == "bce_dice" and ckpt["class_weights"] is None  # the types recipe's flags stay out
    cv = json.loads((out / "cv" / "cv.json").read_text())
    assert cv["folds"] == 5 and len(cv["last_epoch"]["dice"]) == 5 and sum(cv["last_epoch"]["n"]) <= 10

    # continued with --resume OUT_DIR/cv, as an interrupted recipe is: the finished folds are kept as they are
    before = [path.read_bytes() for path in models]
    proc = run_recipe(str(data), str(out), "--size", str(SIZE), "--width", "4", "--device", "cpu",
                      "--resume", str(out / "cv"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("holds all 1 epoch: nothing left to train") == 5
    assert [path.read_bytes() for path in models] == before

    # the README's inference command on those models: masks and 8-bit maps named and sized like the inputs
    src = tmp_path / "imgs"
    src.mkdir()
    for j, path in enumerate(images[:3]):  # other sizes and JPEG, as COVID-SemiSeg's slices are
        Image.open(path).resize((50 + 10 * j, 70), Image.BILINEAR).convert("L").save(src / f"{j + 17}.jpg")
    proc = run_script("infer.py", "--checkpoint", *map(str, models), "--input", str(src), "--output",
                      str(tmp_path / "pred"), "--save-probs", str(tmp_path / "prob"), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for j in range(3):
        for folder in ("pred", "prob"):
            with Image.open(tmp_path / folder / f"{j + 17}.png") as img:
                assert img.size == (50 + 10 * j, 70) and img.mode == "L"
        assert set(np.unique(np.asarray(Image.open(tmp_path / "pred" / f"{j + 17}.png")))) <= {0, 255}

    # a rerun with fewer folds into the same OUT_DIR leaves only its own fold models for OUT_DIR/*.pth
    proc = run_recipe(str(data), str(out), "--size", str(SIZE), "--width", "4", "--device", "cpu", "--folds", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.pth")) == ["fold0.pth", "fold1.pth"]
    assert (out / "models.txt").read_text().split() == ["fold0.pth", "fold1.pth"]
    for i in range(2):  # this run's models
        assert (out / f"fold{i}.pth").read_bytes() == (out / "cv" / f"fold{i}" / "last.pth").read_bytes()


def test_recipe_without_arguments_prints_its_usage():
    proc = run_recipe()
    assert proc.returncode == 2 and "usage: bash scripts/covid_semiseg.sh TRAIN_DIR OUT_DIR" in proc.stderr
