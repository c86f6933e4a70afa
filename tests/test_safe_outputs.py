"""The data commands' outputs (issue 13): data.preprocess, data.split_data --pairs and data.synthetic replace
only what they wrote themselves or what --overwrite names, never a folder that is or holds their input, and
refuse anything else with one line naming the path, before any work and with every file left as it was."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data import preprocess as prep_mod
from data import split_data, synthetic
from data.transforms import InputError
from tests.conftest import run_module
from utils.cli import run_cli

SMALL = ("--size", "16", "--workers", "1")  # data.preprocess flags for the tiny volumes of make_volume_dir
PHANTOM = ("--patients", "1", "--shape", "32", "32", "1")  # the smallest data.synthetic run


def snapshot(root: Path) -> dict:
    """Every file under ``root`` (or ``root`` itself when a file), path -> bytes: 'untouched' means equal."""
    root = Path(root)
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(module, capsys, *argv) -> tuple[int, str, str]:
    """Run a data command's main through the shared CLI handling, in this process: (exit code, stdout, stderr)."""
    try:
        run_cli(module.main, module.get_args_parser(), [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *words) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("error: ")
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def unrelated_folder(path: Path) -> Path:
    """A user's folder with files no data command wrote (a notes file and a scan in a subfolder)."""
    (path / "scans").mkdir(parents=True)
    (path / "notes.txt").write_text("do not lose me\n")
    (path / "scans" / "ct.nii.gz").write_bytes(b"\x1f\x8b precious bytes")
    return path


# ----------------------------------------------------------------------------- data.preprocess (issue case 1)
def test_preprocess_refuses_an_out_that_is_its_src(tmp_path, capsys, make_volume_dir):
    src = make_volume_dir(tmp_path / "D")
    before = snapshot(src)
    code, _, err = run(prep_mod, capsys, "--src", src, "--out", src, *SMALL)
    assert_one_line_error(code, err, src, "--out")
    assert snapshot(src) == before


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_preprocess_refuses_an_out_that_holds_its_src_even_with_overwrite(tmp_path, capsys, make_volume_dir,
                                                                          overwrite):
    src = make_volume_dir(tmp_path / "data" / "D")
    before = snapshot(tmp_path / "data")
    code, _, err = run(prep_mod, capsys, "--src", src, "--out", tmp_path / "data", *SMALL, *overwrite)
    assert_one_line_error(code, err, tmp_path / "data", "--out")
    assert snapshot(tmp_path / "data") == before


def test_preprocess_refuses_an_out_inside_src_that_holds_its_volumes_even_with_overwrite(tmp_path, capsys,
                                                                                        make_volume_dir):
    src = make_volume_dir(tmp_path / "D")
    before = snapshot(src)
    code, _, err = run(prep_mod, capsys, "--src", src, "--out", src / "images", *SMALL, "--overwrite")
    assert_one_line_error(code, err, src / "images", "--out")
    assert snapshot(src) == before


def test_preprocess_refuses_an_out_folder_it_did_not_write(tmp_path, capsys, make_volume_dir):
    src = make_volume_dir(tmp_path / "D")
    out = unrelated_folder(tmp_path / "U")
    before, siblings = snapshot(out), sorted(os.listdir(tmp_path))
    code, _, err = run(prep_mod, capsys, "--src", src, "--out", out, *SMALL)
    assert_one_line_error(code, err, out, "--overwrite")
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == siblings  # refused before any work: no temporary folder either


def test_preprocess_refuses_an_out_that_is_an_existing_file(tmp_path, capsys, make_volume_dir):
    src = make_volume_dir(tmp_path / "D")
    out = tmp_path / "result.npy"
    out.write_bytes(b"a file the user keeps")
    code, _, err = run(prep_mod, capsys, "--src", src, "--out", out, *SMALL)
    assert_one_line_error(code, err, out, "file")
    assert out.read_bytes() == b"a file the user keeps"


def test_preprocess_replaces_its_own_earlier_output(tmp_path, capsys, make_volume_dir):
    src = make_volume_dir(tmp_path / "D")
    out = tmp_path / "P"
    assert run(prep_mod, capsys, "--src", src, "--out", out, *SMALL)[0] == 0
    (out / "splits.json").write_text("{}")  # split_data's addition still leaves it recognisably ours
    code, _, err = run(prep_mod, capsys, "--src", src, "--out", out, "--size", "32", "--workers", "1")
    assert code == 0, err
    assert np.load(out / "images.npy").shape[1:] == (32, 32)
    assert not (out / "splits.json").exists()  # replaced whole: no stale split of the earlier arrays


def test_preprocess_overwrite_replaces_an_unrelated_folder(tmp_path, capsys, make_volume_dir):
    src = make_volume_dir(tmp_path / "D")
    out = unrelated_folder(tmp_path / "U")
    code, _, err = run(prep_mod, capsys, "--src", src, "--out", out, *SMALL, "--overwrite")
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "images.npy").is_file()
    assert prep_mod.written_by_preprocess(out)


def test_preprocess_leaves_the_callers_torch_thread_count_alone(tmp_path, make_volume_dir):
    src = make_volume_dir(tmp_path / "D")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # not 1, so a preprocess that pins one thread is seen
        prep_mod.preprocess(src, tmp_path / "P", size=16, workers=1, progress=False)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- data.split_data --pairs (case 2)
@pytest.fixture
def pairs(tmp_path, make_pair_folder) -> Path:
    make_pair_folder(tmp_path / "P" / "Imgs", tmp_path / "P" / "GT", n=4)
    return tmp_path / "P"


def test_split_pairs_refuses_an_out_folder_it_did_not_write(tmp_path, capsys, pairs):
    out = unrelated_folder(tmp_path / "U")
    before = snapshot(out)
    code, _, err = run(split_data, capsys, "--pairs", pairs, "--out", out, "--val", "0.25")
    assert_one_line_error(code, err, out, "--overwrite")
    assert snapshot(out) == before


def test_split_pairs_refuses_an_out_that_is_an_existing_file(tmp_path, capsys, pairs):
    out = tmp_path / "split.zip"
    out.write_bytes(b"keep")
    code, _, err = run(split_data, capsys, "--pairs", pairs, "--out", out, "--val", "0.25")
    assert_one_line_error(code, err, out, "file")
    assert out.read_bytes() == b"keep"


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_split_pairs_refuses_an_out_that_holds_the_pair_folders(tmp_path, capsys, make_pair_folder, overwrite):
    # COVID-SemiSeg's layout: the pairs sit deep inside the folder given as --pairs; an --out above them
    # but inside --pairs would replace them
    root = tmp_path / "COVID-SemiSeg"
    deep = root / "TrainingSet" / "LungInfection-Train" / "Doctor-label"
    make_pair_folder(deep / "Imgs", deep / "GT", n=4)
    before = snapshot(root)
    code, _, err = run(split_data, capsys, "--pairs", root, "--out", root / "TrainingSet", "--val", "0.25",
                       *overwrite)
    assert_one_line_error(code, err, root / "TrainingSet", "--out")
    assert snapshot(root) == before


def test_split_pairs_reruns_into_its_own_split_and_marks_it(tmp_path, capsys, pairs):
    out = tmp_path / "U"
    assert run(split_data, capsys, "--pairs", pairs, "--out", out, "--val", "0.25", "--seed", "0")[0] == 0
    code, _, err = run(split_data, capsys, "--pairs", pairs, "--out", out, "--val", "0.5", "--seed", "1")
    assert code == 0, err
    record = json.loads((out / "split.json").read_text())
    assert record["seed"] == 1 and len(record["val"]) == 2 and len(record["train"]) == 2
    assert sorted(p.name for p in (out / "val_images").iterdir()) == sorted(record["val"])


def test_split_pairs_overwrite_replaces_an_unrelated_folder(tmp_path, capsys, pairs):
    out = unrelated_folder(tmp_path / "U")
    code, _, err = run(split_data, capsys, "--pairs", pairs, "--out", out, "--val", "0.25", "--overwrite")
    assert code == 0, err
    assert not (out / "notes.txt").exists() and split_data.written_by_split(out)


def test_split_pairs_inside_the_pair_folder_leaves_the_pairs_and_is_not_read_back(tmp_path, capsys, pairs):
    before = snapshot(pairs)
    first = split_data.split_pair_folder(pairs, pairs / "split", val=0.25, seed=0)
    assert {k: v for k, v in snapshot(pairs).items() if not k.startswith("split/")} == before
    # the split inside is not taken for source pairs by the next run
    assert split_data.split_pair_folder(pairs, pairs / "split", val=0.25, seed=0) == first


@pytest.mark.parametrize("argv", [("--val", "1.5"), ("--val", "-0.1")])
def test_split_bad_fractions_are_one_line_errors(tmp_path, capsys, pairs, argv):
    # utils.cli shows InputError as one line and lets a plain ValueError (a bug) keep its traceback
    code, _, err = run(split_data, capsys, "--pairs", pairs, "--out", tmp_path / "U", *argv)
    assert_one_line_error(code, err, "--val")
    assert not (tmp_path / "U").exists()


# ----------------------------------------------------------------------------- data.synthetic (case 12)
@pytest.mark.parametrize("argv, words", [(("--patients", "0"), ("--patients", "0")),
                                         (("--shape", "8", "8", "1"), ("--shape", "too small"))])
def test_synthetic_bad_arguments_are_one_line_errors(tmp_path, argv, words):
    res = run_module("data.synthetic", "--out", tmp_path / "S", *argv)
    assert_one_line_error(res.returncode, res.stderr, *words)
    assert not (tmp_path / "S").exists()


def test_synthetic_refuses_an_out_that_is_an_existing_file(tmp_path):
    out = tmp_path / "phantoms"
    out.write_bytes(b"keep")
    res = run_module("data.synthetic", "--out", out, *PHANTOM)
    assert_one_line_error(res.returncode, res.stderr, out, "file")
    assert out.read_bytes() == b"keep"


def test_synthetic_out_below_a_file_is_one_line_error(tmp_path):
    (tmp_path / "f").write_bytes(b"keep")
    res = run_module("data.synthetic", "--out", tmp_path / "f" / "phantoms", *PHANTOM)
    assert_one_line_error(res.returncode, res.stderr, tmp_path / "f" / "phantoms")
    assert (tmp_path / "f").read_bytes() == b"keep"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_synthetic_read_only_out_is_one_line_error(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        res = run_module("data.synthetic", "--out", tmp_path / "ro" / "phantoms", *PHANTOM)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert_one_line_error(res.returncode, res.stderr, tmp_path / "ro" / "phantoms")


def test_synthetic_refuses_an_out_folder_it_did_not_write(tmp_path, capsys):
    # e.g. a real dataset in the same images/ lung_masks/ layout: phantoms must not be mixed into it
    out = unrelated_folder(tmp_path / "U")
    (out / "images").mkdir()
    (out / "images" / "patient_1.nii.gz").write_bytes(b"real scan")
    before = snapshot(out)
    code, _, err = run(synthetic, capsys, "--out", out, *PHANTOM)
    assert_one_line_error(code, err, out, "--overwrite")
    assert snapshot(out) == before


def test_synthetic_reruns_into_its_own_output_and_overwrite_replaces_another(tmp_path, capsys):
    out = tmp_path / "S"
    assert run(synthetic, capsys, "--out", out, "--patients", "2", "--shape", "32", "32", "1")[0] == 0
    code, _, err = run(synthetic, capsys, "--out", out, *PHANTOM)  # `make demo` twice
    assert code == 0, err
    assert sorted(p.name for p in (out / "images").iterdir()) == ["phantom_000.nii.gz"]
    other = unrelated_folder(tmp_path / "U")
    code, _, err = run(synthetic, capsys, "--out", other, *PHANTOM, "--overwrite")
    assert code == 0, err
    assert not (other / "notes.txt").exists() and synthetic.written_by_synthetic(other)


def test_synthetic_api_raises_input_error_for_a_foreign_folder(tmp_path):
    out = unrelated_folder(tmp_path / "U")
    with pytest.raises(InputError, match="did not write"):
        synthetic.generate_dataset(out, patients=1, seed=0, shape=(32, 32, 1))
