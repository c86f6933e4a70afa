"""data.split_data: seeded splits by patient or slice, splits.json, and pair-folder splits."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data.dataset import PairFolderDataset, find_pair_dirs, pair_files
from data.split_data import get_args_parser, main, make_splits, split_pair_folder, split_preprocessed
from data.transforms import InputError
from utils.cli import run_cli

PARTS = ("train", "val", "test")


def slice_cases(n_patients: int, seed: int = 0) -> list[str]:
    """Case id of every slice row, patients of 3-9 slices each, in row order as meta.json lists them."""
    counts = np.random.default_rng(seed).integers(3, 10, n_patients)
    return [f"p{i:02d}" for i, n in enumerate(counts) for _ in range(n)]


def assert_partition(splits, items):
    parts = [splits[k] for k in PARTS]
    for part in parts:
        assert part == sorted(part)
    assert sum(len(p) for p in parts) == len(set().union(*map(set, parts)))  # disjoint
    assert set().union(*map(set, parts)) == set(items)  # covering


def test_by_patient_no_patient_in_two_splits():
    cases = slice_cases(20)
    splits = make_splits(cases, val=0.15, test=0.15, seed=0)
    assert splits["by"] == "patient" and splits["seed"] == 0
    assert_partition(splits, set(cases))
    assert [len(splits[k]) for k in PARTS] == [14, 3, 3]


@pytest.mark.parametrize("val, test, sizes", [(0.25, 0.1, [13, 5, 2]), (0.2, 0.0, [16, 4, 0]), (0.0, 0.5, [10, 0, 10])])
def test_fractions_respected(val, test, sizes):
    splits = make_splits(slice_cases(20), val=val, test=test, seed=1)
    assert [len(splits[k]) for k in PARTS] == sizes


def test_seeded():
    cases = slice_cases(20)
    parts = lambda splits: [splits[k] for k in PARTS]  # noqa: E731 - without the "seed" entry
    assert parts(make_splits(cases, seed=3)) == parts(make_splits(list(cases), seed=3))
    for other in (4, 5):
        assert parts(make_splits(cases, seed=other)) != parts(make_splits(cases, seed=3))
    # the order rows arrive in does not matter, only the set of patients
    assert make_splits(sorted(cases, reverse=True), seed=3) == make_splits(cases, seed=3)


def test_by_slice_gives_row_indices():
    cases = slice_cases(6)
    splits = make_splits(cases, val=0.2, test=0.1, by="slice", seed=0)
    assert splits["by"] == "slice"
    assert_partition(splits, range(len(cases)))
    assert all(isinstance(r, int) for k in PARTS for r in splits[k])
    assert len(splits["val"]) == round(0.2 * len(cases)) and len(splits["test"]) == round(0.1 * len(cases))


@pytest.mark.parametrize("n, sizes", [(3, [1, 1, 1]), (2, [1, 0, 1]), (1, [1, 0, 0])])
def test_tiny_sets_keep_a_training_patient(n, sizes):
    splits = make_splits([f"p{i}" for i in range(n) for _ in range(4)], val=0.15, test=0.15)
    assert [len(splits[k]) for k in PARTS] == sizes
    assert_partition(splits, {f"p{i}" for i in range(n)})


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="val"):
        make_splits(slice_cases(5), val=0.6, test=0.4)
    with pytest.raises(ValueError, match="val"):
        make_splits(slice_cases(5), val=-0.1)
    with pytest.raises(ValueError, match="by"):
        make_splits(slice_cases(5), by="volume")
    with pytest.raises(InputError, match="meta.json"):
        split_preprocessed(tmp_path / "not_preprocessed")


def _meta_folder(tmp_path, cases):
    (tmp_path / "meta.json").write_text(json.dumps({"slices": [{"case": c, "z": 0} for c in cases]}))
    return tmp_path


def test_split_preprocessed_writes_splits_json(tmp_path):
    cases = slice_cases(10)
    splits = split_preprocessed(_meta_folder(tmp_path, cases), val=0.2, test=0.2, seed=7)
    assert json.loads((tmp_path / "splits.json").read_text()) == splits
    assert splits == make_splits(cases, 0.2, 0.2, "patient", 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "splits.json"]  # no temporary left


def test_cli_writes_splits_json(tmp_path, cli):
    cases = slice_cases(8)
    _meta_folder(tmp_path, cases)
    proc = cli("data.split_data", "--data", tmp_path, "--val", "0.25", "--test", "0.25", "--seed", "2")
    assert proc.returncode == 0, proc.stderr
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert splits == make_splits(cases, 0.25, 0.25, "patient", 2)
    assert "4 train / 2 val / 2 test patients" in proc.stdout


def _run(capsys, *argv):
    try:
        run_cli(main, get_args_parser(), [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_by_slice_warns_about_leakage(tmp_path, capsys):
    _meta_folder(tmp_path, slice_cases(4))
    code, out, _ = _run(capsys, "--data", tmp_path, "--by", "slice")
    assert code == 0 and "leakage" in out
    assert json.loads((tmp_path / "splits.json").read_text())["by"] == "slice"


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = _run(capsys, "--data", tmp_path / "none")
    assert code == 1 and err.count("\n") == 1 and "meta.json" in err and "data.preprocess" in err
    code, _, err = _run(capsys, "--pairs", tmp_path)
    assert code == 1 and err.strip() == "error: --pairs needs --out DEST"
    code, _, err = _run(capsys, "--pairs", tmp_path, "--out", tmp_path / "dest")
    assert code == 1 and str(tmp_path) in err and "train_images" in err


# ----------------------------------------------------------------------------- pair folders
def _listing(dest):
    return {d: sorted(os.listdir(dest / d)) for d in ("train_images", "train_masks", "val_images", "val_masks")}


def test_split_pair_folder_copies_without_overlap(tmp_path, make_pair_folder):
    made = make_pair_folder(tmp_path / "src" / "train_images", tmp_path / "src" / "train_masks", n=10,
                            mask_suffix="_mask")
    parts = split_pair_folder(tmp_path / "src", tmp_path / "dest", val=0.3, seed=0)
    names = {ip.name for ip, _, _ in made}
    assert len(parts["val"]) == 3 and len(parts["train"]) == 7
    assert set(parts["train"]) | set(parts["val"]) == names and not set(parts["train"]) & set(parts["val"])
    listing = _listing(tmp_path / "dest")
    assert listing["train_images"] == listing["train_masks"] == sorted(parts["train"])  # masks renamed to image names
    assert listing["val_images"] == listing["val_masks"] == sorted(parts["val"])
    # the copies pair up again, each image with its own mask
    by_name = {ip.name: mp for ip, mp, _ in made}
    for part in ("train", "val"):
        pairs = pair_files(*find_pair_dirs(tmp_path / "dest", part))
        assert len(pairs) == len(parts[part])
        for ip, mp in pairs:
            assert mp.read_bytes() == by_name[ip.name].read_bytes()
        assert len(PairFolderDataset(pairs, {"size": 32})) == len(parts[part])
    assert split_pair_folder(tmp_path / "src", tmp_path / "again", val=0.3, seed=0) == parts  # seeded


def test_split_pair_folder_again_into_the_same_folder_does_not_overlap(tmp_path, make_pair_folder):
    """Re-splitting with another seed into the same DEST must not leave the first split's files behind."""
    make_pair_folder(tmp_path / "src" / "train_images", tmp_path / "src" / "train_masks", n=10)
    split_pair_folder(tmp_path / "src", tmp_path / "dest", val=0.3, seed=0)
    parts = split_pair_folder(tmp_path / "src", tmp_path / "dest", val=0.3, seed=1)
    listing = _listing(tmp_path / "dest")
    assert not set(listing["train_images"]) & set(listing["val_images"]), "a file is in both train and val"
    assert listing["train_images"] == sorted(parts["train"]) and listing["val_images"] == sorted(parts["val"])


def test_split_pair_folder_reads_covid_semiseg_layout(tmp_path, make_pair_folder):
    base = tmp_path / "src" / "TrainingSet" / "LungInfection-Train" / "Doctor-label"
    make_pair_folder(base / "Imgs", base / "GT", n=5, image_ext=".jpg")
    parts = split_pair_folder(tmp_path / "src", tmp_path / "dest", val=0.2, seed=0)
    listing = _listing(tmp_path / "dest")
    assert len(parts["val"]) == 1 and listing["val_images"] == parts["val"] and parts["val"][0].endswith(".jpg")
    assert listing["val_masks"] == [parts["val"][0].replace(".jpg", ".png")]
    assert len(listing["train_images"]) == 4


def test_kfold_partitions_every_item_once():
    from data.split_data import kfold

    folds = kfold(50, 5, seed=0)
    assert [len(f) for f in folds] == [10] * 5
    assert sorted(i for f in folds for i in f) == list(range(50))  # no slice in two folds' validation parts
    assert kfold(50, 5, seed=0) == folds and kfold(50, 5, seed=1) != folds
    assert [len(f) for f in kfold(7, 3)] == [3, 2, 2]
    with pytest.raises(InputError):
        kfold(3, 5)
