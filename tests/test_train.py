"""End-to-end tests of train.py: tiny CPU runs on synthetic phantoms and on folders of PNG pairs."""
from __future__ import annotations

import csv
import json
import math
import re
import shutil

import pytest
import torch
from PIL import Image

import train
from data.dataset import SliceArrayDataset, dataset_bytes
from data.transforms import InputError
from engine.training import build_datasets, data_on_device
from tests.script_fixtures import (SIZE, export_pairs, processed, run_script, run_train,  # noqa: F401
                                   train_argv, trained)
from models import model_from_checkpoint
from utils.cli import run_cli
from utils import helpers
from utils.helpers import seed_everything

EPOCH_LINE = re.compile(r"^train_loss: (\S+) \| val_loss: (\S+) \| val_dice: (\S+) \| val_iou: (\S+)")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def out_channels(ckpt: dict) -> int:
    """Output channels of the model a checkpoint rebuilds, from a real forward pass."""
    model = model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        return model(torch.rand(1, 1, SIZE, SIZE)).shape[1]


# ----------------------------------------------------------------------------- the main run
@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_first_line_says_when_a_cpu_trains_in_fp32_for_want_of_bf16(processed, tmp_path, monkeypatch, capsys,
                                                                      native_bf16):
    monkeypatch.setattr(helpers, "cpu_has_bf16", lambda: native_bf16)
    run_train(train_argv(processed, tmp_path / "out", "--no-augment"))
    first = next(line for line in capsys.readouterr().out.splitlines() if "parameters" in line)
    assert ("with bfloat16 autocast" in first) == native_bf16
    assert ("in fp32 (this CPU has no native bf16" in first) == (not native_bf16)
    assert "in fp32" not in helpers.precision_words(torch.device("cpu"), torch.bfloat16)


def test_short_run_lowers_loss_and_writes_outputs(trained):
    out, history = trained["out"], trained["result"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert [line for line in trained["stdout"].splitlines() if line.startswith("Epoch ")] == \
        [f"Epoch {i}/6" for i in range(1, 7)]
    losses = [h["train_loss"] for h in history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses
    for name in ("best_model.pth", "last.pth", "history.csv", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with Image.open(out / "curves.png") as img:
        assert img.format == "PNG" and min(img.size) > 100

    rows = read_csv(out / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for row, h in zip(rows, history):
        for key in ("train_loss", "val_loss", "val_dice", "val_iou"):
            assert float(row[key]) == pytest.approx(h[key], rel=1e-6, nan_ok=True)

    dices = [-1.0 if math.isnan(h["val_dice"]) else h["val_dice"] for h in history]
    assert trained["result"]["best_dice"] == pytest.approx(max(dices))


@pytest.mark.parametrize("name", ["best_model.pth", "last.pth"])
def test_checkpoints_are_self_describing(trained, processed, name):
    history = trained["result"]["history"]
    ckpt = torch.load(trained["out"] / name, weights_only=True)  # plain data and tensors only
    assert ckpt["model_config"] == {"name": "unet", "in_channels": 1, "num_classes": 1, "width": 8}
    assert ckpt["num_classes"] == 1 and ckpt["task"] == "lesion" and ckpt["loss"] == "bce_dice"
    meta_prep = json.loads((processed / "meta.json").read_text())["preprocessing"]
    assert ckpt["preprocessing"] == meta_prep == {"size": SIZE, "norm": "window", "window": [-1000.0, 400.0]}
    args = ckpt["args"]
    assert args["model"] == "unet" and args["epochs"] == 6 and args["lr"] == 0.01 and args["width"] == 8
    assert args["data"] == str(processed) and args["seed"] == 0 and args["augment"] == "none"

    # epoch is 0-based; the checkpoint's metrics are that epoch's validation results
    epoch = ckpt["epoch"]
    if name == "last.pth":
        assert epoch == len(history) - 1
    else:
        dices = [-1.0 if math.isnan(h["val_dice"]) else h["val_dice"] for h in history]
        assert epoch == dices.index(max(dices))
    assert ckpt["metrics"]["dice"] == pytest.approx(history[epoch]["val_dice"], nan_ok=True)
    assert ckpt["metrics"]["loss"] == pytest.approx(history[epoch]["val_loss"])
    assert ckpt["history"][-1]["epoch"] == epoch + 1

    assert set(ckpt["optimizer"]) == {"state", "param_groups"} and ckpt["optimizer"]["state"]
    assert ckpt["scheduler"]["last_epoch"] == (epoch + 1) * 4  # 16 train slices / batch 4 = 4 steps an epoch
    assert isinstance(ckpt["scaler"], dict)

    model = model_from_checkpoint(ckpt)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    assert out_channels(ckpt) == 1


def test_console_prints_one_seed_style_line_per_epoch(processed, tmp_path, capsys):
    result = run_train(train_argv(processed, tmp_path, epochs=2))
    lines = capsys.readouterr().out.splitlines()
    for epoch, h in zip((1, 2), result["history"]):
        i = lines.index(f"Epoch {epoch}/2")
        m = EPOCH_LINE.match(lines[i + 1])
        assert m, lines[i + 1]
        for text, key in zip(m.groups(), ("train_loss", "val_loss", "val_dice", "val_iou")):
            assert re.fullmatch(r"\d+\.\d{4}|nan", text), text
            assert float(text) == pytest.approx(h[key], abs=5e-5, nan_ok=True)


# ----------------------------------------------------------------------------- resuming
def test_resume_continues_at_the_next_epoch(processed, tmp_path, capsys):
    base = ["--sched", "none", "--lr", "3e-3"]
    first = run_train(train_argv(processed, tmp_path / "run", *base, epochs=2))
    capsys.readouterr()
    resumed = run_train(train_argv(processed, tmp_path / "run", *base, "--resume", str(tmp_path / "run" / "last.pth"),
                                   epochs=4))
    out = capsys.readouterr().out
    assert "resumed" in out
    assert "Epoch 3/4" in out and "Epoch 4/4" in out
    assert "Epoch 1/4" not in out and "Epoch 2/4" not in out

    history = resumed["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == first["history"]
    assert [int(r["epoch"]) for r in read_csv(tmp_path / "run" / "history.csv")] == [1, 2, 3, 4]
    last = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert last["epoch"] == 3 and len(last["history"]) == 4

    # a run interrupted after epoch 2 and resumed follows the uninterrupted run (constant LR, reseeded epochs)
    straight = run_train(train_argv(processed, tmp_path / "straight", *base, epochs=4))
    for a, b in zip(history, straight["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3), (a, b)


def test_resume_with_more_epochs_and_a_lower_lr_follows_the_new_one_cycle(processed, tmp_path, capsys):
    # one-cycle's state holds its length, and the optimizer's its rates: resuming a 2-epoch cycle with
    # --epochs 4 used to fail with "Tried to step 10 times" at the old cycle's end, and a lower --lr (what a
    # diverged run's message advises) was silently dropped for the checkpoint's
    base = ["--opt", "adamw", "--sched", "onecycle"]
    run_train(train_argv(processed, tmp_path / "run", *base, "--lr", "3e-3", epochs=2))
    capsys.readouterr()
    resumed = run_train(train_argv(processed, tmp_path / "run", *base, "--lr", "1e-3", "--weight-decay", "1e-4",
                                   "--resume", str(tmp_path / "run" / "last.pth"), epochs=4))
    assert ("at epoch 3/4 (--lr 0.001, not 0.003; --weight-decay 0.0001, not 0; the onecycle learning-rate schedule "
            "now spans 4 epochs, not 2)") in capsys.readouterr().out
    straight = run_train(train_argv(processed, tmp_path / "straight", *base, "--lr", "1e-3", epochs=4))
    lrs = [[h["lr"] for h in run["history"]] for run in (resumed, straight)]
    assert lrs[0][2:] == pytest.approx(lrs[1][2:], rel=1e-6) and lrs[0][1] != pytest.approx(lrs[1][1])
    assert lrs[0][-1] < 1e-7  # the cycle's end: lr / 25 / 1e4
    groups = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-4] * len(groups)
    run_train(train_argv(processed, tmp_path / "run", *base, "--lr", "1e-3", "--weight-decay", "1e-4", "--resume",
                         str(tmp_path / "run" / "last.pth"), epochs=2))
    assert f"{tmp_path / 'run' / 'last.pth'} holds 4 epochs, more than --epochs 2: nothing left to train" in \
        capsys.readouterr().out

    for flag, other in (("--sched", "cosine"), ("--opt", "adam")):  # their states fit their own kind only
        argv = train_argv(processed, tmp_path / "run", *base, flag, other, "--resume",
                          str(tmp_path / "run" / "last.pth"), epochs=6)
        with pytest.raises(InputError, match=rf"trained with {flag} \S+, asked for {flag} {other}"):
            run_train(argv)


def test_resume_refuses_a_checkpoint_of_another_model(trained, processed, tmp_path):
    with pytest.raises(InputError, match=r"holds .*num_classes.: 1.*asked for .*num_classes.: 2"):
        run_train(train_argv(processed, tmp_path, "--loss", "ce", "--resume", str(trained["out"] / "last.pth")))


def test_resume_with_another_width_is_one_clear_line(trained, processed, tmp_path, capsys):
    # the checkpoint holds a width-8 U-Net; forgetting --width (default 32) must not end in a traceback
    argv = train_argv(processed, tmp_path, "--resume", str(trained["out"] / "last.pth"), width=32, epochs=8)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, train.get_args_parser(), argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "last.pth" in err[0], err[:3]


# ----------------------------------------------------------------------------- data kinds
def test_trains_on_a_folder_of_pairs_in_the_seed_layout(processed, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    train_files = export_pairs(processed, "train", pairs, "train_images", "train_masks")
    val_files = export_pairs(processed, "val", pairs, "val_images", "val_masks")
    assert len(train_files) == 16 and len(val_files) == 8
    result = run_train(train_argv(pairs, tmp_path / "out", epochs=1))
    assert "16 train / 8 val slices" in capsys.readouterr().out
    assert math.isfinite(result["history"][0]["train_loss"])
    ckpt = torch.load(tmp_path / "out" / "best_model.pth", weights_only=True)
    assert ckpt["data"]["kind"] == "pairs" and "data_kind" not in ckpt  # data_kind: dropped, it was never read
    assert ckpt["preprocessing"]["size"] == SIZE and ckpt["preprocessing"]["norm"] == "minmax"


def test_trains_on_a_covid_semiseg_folder_holding_out_validation(processed, tmp_path, capsys):
    root = tmp_path / "semiseg"
    files = export_pairs(processed, None, root, "Imgs", "GT", n=8)
    for png in files:  # COVID-SemiSeg ships JPG images with PNG masks of the same stem
        with Image.open(png) as img:
            img.convert("RGB").save(png.with_suffix(".jpg"), quality=95)
        png.unlink()
    result = run_train(train_argv(root, tmp_path / "out", "--val-fraction", "0.25", epochs=1))
    assert "6 train / 2 val slices" in capsys.readouterr().out
    assert math.isfinite(result["history"][0]["val_loss"])
    assert (tmp_path / "out" / "best_model.pth").is_file()


# ----------------------------------------------------------------------------- losses, tasks, models
@pytest.mark.parametrize("loss,channels", [("bce", 1), ("dice", 1), ("bce_dice", 1), ("ce", 2), ("ce_dice", 2)])
def test_each_loss_trains_with_the_right_output_channels(processed, tmp_path, loss, channels):
    result = run_train(train_argv(processed, tmp_path, "--loss", loss, epochs=1))
    h = result["history"][0]
    assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]), h
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["loss"] == loss and ckpt["num_classes"] == channels
    assert ckpt["model_config"]["num_classes"] == channels and out_channels(ckpt) == channels


def test_lung_and_lesion_task_trains_three_channels(processed, tmp_path):
    result = run_train(train_argv(processed, tmp_path, "--task", "lung+lesion", epochs=1))
    h = result["history"][0]
    assert math.isfinite(h["train_loss"])
    assert 0.0 <= h["val_lung_dice"] <= 1.0 and "val_lesion_dice" in h
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["task"] == "lung+lesion" and ckpt["loss"] == "ce_dice" and ckpt["num_classes"] == 3
    assert out_channels(ckpt) == 3


def test_binary_loss_on_three_classes_is_refused(processed, tmp_path):
    with pytest.raises(InputError, match="ce, ce_dice, ce_dice_union"):
        run_train(train_argv(processed, tmp_path, "--task", "lung+lesion", "--loss", "bce"))


def test_deeplabv3_trains(processed, tmp_path, capsys):
    # DeepLabV3 (39.6M parameters) is slow on CPU: 4 slices of 32x32, one step of batch 2
    root = tmp_path / "few"
    export_pairs(processed, "train", root, "Imgs", "GT", n=4)
    result = run_train(train_argv(root, tmp_path / "out", "--model", "deeplabv3", "--size", "32",
                                  "--val-fraction", "0.25", epochs=1, batch_size=2))
    assert "3 train / 1 val slices" in capsys.readouterr().out
    h = result["history"][0]
    assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])
    ckpt = torch.load(tmp_path / "out" / "last.pth", weights_only=True)
    assert ckpt["model_config"]["name"] == "deeplabv3" and ckpt["loss"] == "ce_dice" and ckpt["num_classes"] == 2
    model = model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)


@pytest.mark.parametrize("flags", [["--amp", "off"], ["--no-channels-last"], ["--amp", "off", "--no-channels-last"]])
def test_precision_and_layout_options_train(processed, tmp_path, capsys, flags):
    result = run_train(train_argv(processed, tmp_path, *flags, epochs=1))
    out = capsys.readouterr().out
    assert math.isfinite(result["history"][0]["train_loss"])
    if "off" in flags:
        assert "autocast" not in out.splitlines()[0]
    args = torch.load(tmp_path / "last.pth", weights_only=True)["args"]
    assert args["channels_last"] is ("--no-channels-last" not in flags)


def test_recipe_options_train_and_are_recorded(processed, tmp_path):
    lr = 3e-3
    runs = {aug: run_train(train_argv(processed, tmp_path / aug, "--augment", aug, "--opt", "adamw", "--weight-decay",
                                      "1e-2", "--sched", "onecycle", "--lr", str(lr), "--tta", "--no-batch-dice",
                                      epochs=2))
            for aug in ("basic", "strong")}
    first = {aug: r["history"][0]["train_loss"] for aug, r in runs.items()}
    assert all(math.isfinite(v) for v in first.values())
    assert first["basic"] != first["strong"]  # the batch warp changed what the model saw
    ckpt = torch.load(tmp_path / "strong" / "last.pth", weights_only=True)
    assert ckpt["args"]["augment"] == "strong" and ckpt["args"]["opt"] == "adamw"
    assert ckpt["args"]["batch_dice"] is False
    assert ckpt["inference"] == {"tta": True}  # infer.py and evaluate.py predict with flip TTA by default
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 1e-2 and group.get("decoupled_weight_decay", True)
    # one-cycle: the rate rises to --lr then anneals to lr / 25 / 1e4 at the last step
    assert max(group["initial_lr"], group["max_lr"]) == pytest.approx(lr)
    assert runs["strong"]["history"][-1]["lr"] == pytest.approx(lr / 25 / 1e4, rel=1e-3)


def test_memory_layout_does_not_change_the_result(processed, tmp_path):
    runs = [run_train(train_argv(processed, tmp_path / str(i), "--amp", "off", *flags, epochs=1))
            for i, flags in enumerate(([], ["--no-channels-last"]))]
    a, b = (r["history"][0] for r in runs)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)


def test_data_on_device_trains_exactly_as_the_dataloader_without_augmentation(processed, tmp_path, capsys):
    # same sampler, same batches, same model init: only where the batches come from differs
    runs = [run_train(train_argv(processed, tmp_path / str(i), "--augment", "none", *flags, epochs=2))
            for i, flags in enumerate(([], ["--data-on-device"]))]
    assert "data held on cpu" in capsys.readouterr().out
    for a, b in zip(*(r["history"] for r in runs), strict=True):
        for key in ("train_loss", "val_loss", "val_dice"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, nan_ok=True), key


def test_data_on_device_augments_batches_there(processed, tmp_path):
    runs = {flag: run_train(train_argv(processed, tmp_path / flag, flag, epochs=1))
            for flag in ("--data-on-device", "--no-data-on-device")}
    losses = {flag: r["history"][0]["train_loss"] for flag, r in runs.items()}
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["--data-on-device"] != losses["--no-data-on-device"]  # BatchAugment drew other transforms
    recorded = {flag: torch.load(tmp_path / flag / "last.pth", weights_only=True)["args"]["data_on_device"]
                for flag in runs}
    assert recorded == {"--data-on-device": True, "--no-data-on-device": False}


def test_data_on_device_resumes_to_the_same_weights(processed, tmp_path):
    # its augmentation draws from the main process's generator, reseeded every epoch, as resume needs
    flags = ("--data-on-device", "--deterministic", "--amp", "off", "--sched", "none")
    straight = run_train(train_argv(processed, tmp_path / "straight", *flags, epochs=2))
    run_train(train_argv(processed, tmp_path / "run", *flags, epochs=1))
    resumed = run_train(train_argv(processed, tmp_path / "run", *flags, "--resume", str(tmp_path / "run" / "last.pth"),
                                   epochs=2))
    assert resumed["history"][-1]["train_loss"] == straight["history"][-1]["train_loss"]
    a, b = (torch.load(tmp_path / d / "last.pth", weights_only=True)["model"] for d in ("straight", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_goes_on_the_device_by_default_only_on_a_gpu_with_room(processed, monkeypatch):
    ds = SliceArrayDataset(processed, "train")
    need = dataset_bytes(ds)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not data_on_device(None, cpu, ds) and data_on_device(True, cpu, ds)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * need + 4, 8 * need))
    assert data_on_device(None, cuda, ds) and not data_on_device(False, cuda, ds)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * need - 4, 8 * need))
    assert not data_on_device(None, cuda, ds)  # over a quarter of the free memory: the DataLoader


def test_cudnn_autotuning_is_on_unless_deterministic(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *args, **kwargs: None)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(0)
    assert torch.backends.cudnn.benchmark is True
    seed_everything(0, deterministic=True)
    assert torch.backends.cudnn.benchmark is False


def test_compiled_training_matches_eager_and_saves_plain_weights(processed, tmp_path, monkeypatch, capsys):
    compiled, real_compile = [], torch.compile

    def compile_(model, **kwargs):  # the aot_eager backend traces as inductor does, without its C++ build
        compiled.append(model)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_)
    runs = [run_train(train_argv(processed, tmp_path / str(i), "--amp", "off", *flags, epochs=1))
            for i, flags in enumerate(([], ["--compile"]))]
    assert len(compiled) == 1 and "torch.compile" in capsys.readouterr().out
    a, b = (r["history"][0] for r in runs)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    ckpt = torch.load(tmp_path / "1" / "last.pth", weights_only=True)
    assert not any(key.startswith("_orig_mod") for key in ckpt["model"])  # the unwrapped module was saved
    model_from_checkpoint(ckpt)  # loads strictly


# ----------------------------------------------------------------------------- bad input
def test_missing_data_is_one_clear_line(tmp_path):
    proc = run_script("train.py", "--data", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out"),
                      "--device", "cpu", "--no-progress")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "nonexistent" in lines[0]
    assert "python -m data.preprocess" in lines[0] or "make demo" in lines[0]
    assert not (tmp_path / "out").exists()


def test_empty_data_folder_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, train.get_args_parser(), train_argv(tmp_path / "empty", tmp_path / "out"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no training data" in err[0] and "run `python" in err[0]


def test_preprocessed_folder_without_splits_says_what_to_run(processed, tmp_path, capsys):
    data = tmp_path / "nosplit"
    shutil.copytree(processed, data)
    (data / "splits.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, train.get_args_parser(), train_argv(data, tmp_path / "out"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python -m data.split_data" in err[0]


def test_init_starts_from_the_weights_of_a_checkpoint(trained, processed, tmp_path):
    # at learning rate 0 the weights stay where they started: the checkpoint's with --init, fresh ones without
    source = trained["out"] / "last.pth"
    flags = ("--lr", "0", "--sched", "none", "--no-augment", "--seed", "3")
    run_train(train_argv(processed, tmp_path / "ft", "--init", str(source), *flags, width=8))
    run_train(train_argv(processed, tmp_path / "scratch", *flags, width=8))
    held = torch.load(source, weights_only=True)
    tuned = torch.load(tmp_path / "ft" / "last.pth", weights_only=True)
    scratch = torch.load(tmp_path / "scratch" / "last.pth", weights_only=True)
    weights = [k for k, v in held["model"].items() if v.is_floating_point() and "running" not in k]
    assert all(torch.equal(tuned["model"][k], held["model"][k]) for k in weights)
    assert not all(torch.equal(scratch["model"][k], held["model"][k]) for k in weights)
    assert tuned["init"]["path"] == str(source.resolve()) and len(tuned["init"]["sha256"]) == 16
    assert scratch["init"] is None


def test_init_from_another_model_or_without_a_fold_is_refused(trained, processed, tmp_path):
    source = trained["out"] / "last.pth"
    with pytest.raises(InputError, match=re.escape(str(source)) + ".*'width': 8.*'width': 4"):
        run_train(train_argv(processed, tmp_path / "a", "--init", str(source), width=4))
    with pytest.raises(InputError, match="--init and --backbone-weights"):
        run_train(train_argv(processed, tmp_path / "b", "--init", str(source), "--backbone-weights", str(source),
                             width=8))
    with pytest.raises(InputError, match="'{fold}' names each fold's file"):
        run_train(train_argv(processed, tmp_path / "c", "--init", str(tmp_path / "fold{fold}.pth"), width=8))
    assert not any((tmp_path / d).exists() for d in "abc"), "a refused run writes nothing"


def test_train_subset_trains_on_fewer_pairs_of_the_same_fold(processed, tmp_path, capsys):
    data = tmp_path / "pairs"
    export_pairs(processed, None, data, "Imgs", "GT", n=12)

    def parts(n):
        train_set, val_set, _, _ = build_datasets(data, "lesion", SIZE, 0.15, 0, "none", 3, 1, train_subset=n)
        return [a for a, _ in train_set.pairs], [a for a, _ in val_set.pairs]

    whole, val = parts(0)
    three, val3 = parts(3)
    five, val5 = parts(5)
    assert len(whole) == 8 and len(three) == 3 and len(five) == 5
    assert val3 == val5 == val, "validation is the fold's, whatever the subset"
    assert set(three) < set(five) < set(whole), "a smaller subset lies inside a larger one"
    assert three != whole[:3] or five != whole[:5], "a seeded draw, not the first files"

    out = tmp_path / "cv"
    result = run_train(train_argv(data, out, "--folds", "3", "--train-subset", "3", epochs=1))
    assert capsys.readouterr().out.count("3 train / 4 val slices") == 3
    assert json.loads((out / "cv.json").read_text())["train_subset"] == result["train_subset"] == 3
    ckpt = torch.load(out / "fold1" / "last.pth", weights_only=True)
    assert ckpt["args"]["train_subset"] == 3 and ckpt["data"]["train"] == 3

    with pytest.raises(InputError, match=re.escape(str(data)) + ".*--train-subset 9: training has 8 pairs"):
        run_train(train_argv(data, tmp_path / "a", "--folds", "3", "--train-subset", "9"))
    with pytest.raises(InputError, match="--train-subset is for folders of image-mask pairs"):
        run_train(train_argv(processed, tmp_path / "b", "--train-subset", "2"))
    assert not any((tmp_path / d).exists() for d in "ab"), "a refused run writes nothing"


def test_one_fold_lands_where_the_whole_cross_validation_puts_it(processed, tmp_path, capsys):
    data = tmp_path / "pairs"
    export_pairs(processed, None, data, "Imgs", "GT", n=6)
    out = tmp_path / "cv"
    for fold in (1, 0):  # one by one into the same OUT: neither overwrites the other
        run_train(train_argv(data, out, "--folds", "3", "--fold", str(fold), epochs=1))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["fold0", "fold1"]
    for fold in (0, 1):
        assert torch.load(out / f"fold{fold}" / "last.pth", weights_only=True)["args"]["fold"] == fold
    assert "cv.json" not in {p.name for p in out.rglob("*")}, "a single fold is no cross-validation"


def test_cross_validation_trains_one_model_per_fold(processed, tmp_path, capsys):
    data = tmp_path / "pairs"
    export_pairs(processed, None, data, "Imgs", "GT", n=12)
    out = tmp_path / "cv"
    result = run_train(train_argv(data, out, "--folds", "3", epochs=1))
    printed = capsys.readouterr().out
    cv = json.loads((out / "cv.json").read_text())
    assert cv["folds"] == 3 and len(cv["best_val_dice"]) == 3 and cv == {k: result[k] for k in cv}
    # every fold holds out a different third of the 12 pairs and trains on the rest
    assert printed.count("8 train / 4 val slices") == 3 and "3-fold cross-validation" in printed
    scored = []
    for i in range(3):
        ckpt = torch.load(out / f"fold{i}" / "best_model.pth", weights_only=True)
        assert ckpt["args"]["fold"] == i and ckpt["args"]["folds"] == 3
        # each fold's final model is scored by evaluate.py on exactly its own validation files
        with open(out / f"fold{i}" / "eval-val" / "per_image.csv") as f:
            files = [row["file"] for row in csv.DictReader(f)]
        assert len(files) == 4
        scored += files
    assert sorted(scored) == sorted(str(p) for p in (data / "Imgs").iterdir())  # each pair scored exactly once
    assert len(cv["last_epoch"]["dice"]) == 3 and set(cv["mean_over_folds"]) == {"dice", "iou", "dice_threshold_averaged"}
