"""End-to-end time of whole-CT inference: a 512x512x300 NIfTI in, lesion + lung masks, report and montage out.

    python bench/volume_speed.py [--slices 300] [--task lung+lesion] [--checkpoint CKPT] [--amp auto]
                                 [--save-probs] [--repeat N] [--json]

Without --checkpoint an untrained U-Net (width 32, the default model) stands in: the time does not depend
on the weights. The clock runs from loading the model and reading the .nii.gz to the last file written, with
the library functions `python infer.py` runs (Python start-up and imports excluded). --save-probs also
writes the lesion probability map (infer.py --save-probs). Each repeat writes a fresh output folder (a
second run into the same one would skip the case as done).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic import generate_patient  # noqa: E402
from data.transforms import make_preprocessing  # noqa: E402
from engine.batch import infer_volumes  # noqa: E402
from engine.predict import Predictor  # noqa: E402
from models import build_model  # noqa: E402
from utils.checkpoint import save_checkpoint  # noqa: E402


def untrained_checkpoint(path: Path, task: str) -> Path:
    classes = {"lesion": 1, "lung": 1, "lung+lesion": 3}[task]
    model = build_model("unet", num_classes=classes)
    save_checkpoint({"model": model.state_dict(), "model_config": {"name": "unet", **model.config},
                     "num_classes": classes, "task": task, "preprocessing": make_preprocessing()}, path)
    return path


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        p = generate_patient(np.random.default_rng([7, 0]), shape=(512, 512, 30))
        data = np.tile(p["image"], (1, 1, -(-args.slices // 30)))[:, :, :args.slices]
        src = tmp / "scan.nii.gz"
        nib.save(nib.Nifti1Image(data, p["affine"]), src)
        ckpt = Path(args.checkpoint) if args.checkpoint else untrained_checkpoint(tmp / "unet.pth", args.task)
        times = []
        for i in range(args.repeat):
            out, probs = tmp / f"out{i}", (tmp / f"probs{i}" if args.save_probs else None)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                predictor = Predictor(ckpt, args.device, args.amp, args.batch_size)
                infer_volumes(predictor, [src], out, 0.5, ckpt, progress=False, batch=False, save_probs=probs)
            times.append(time.perf_counter() - t0)
        files = sorted(out.iterdir()) + sorted(probs.iterdir() if probs else [])
        written = [f"{f.parent.name}/{f.name}" if f.parent == probs else f.name for f in files]
        sizes = {name: f.stat().st_size for name, f in zip(written, files)}
    res = {"volume_shape": [512, 512, args.slices], "task": args.task, "device": args.device, "amp": args.amp,
           "save_probs": args.save_probs,
           "threads": torch.get_num_threads(), "seconds": min(times), "seconds_all": times,
           "slices_per_s": args.slices / min(times), "outputs": written, "bytes": sizes}
    print(f"512x512x{args.slices} volume, U-Net ({args.task}), {args.device}, amp {args.amp}: "
          f"{min(times):.1f} s end to end ({args.slices / min(times):.1f} slices/s); wrote {', '.join(written)}")
    if args.json:
        print(json.dumps(res))
    return res


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--task", default="lung+lesion", choices=("lesion", "lung", "lung+lesion"))
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--save-probs", action="store_true", help="also write the lesion probability map")
    p.add_argument("--json", action="store_true")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
