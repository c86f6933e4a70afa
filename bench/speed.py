"""Training, inference and data-loading throughput of the project's code, beside a plain baseline.

    python bench/speed.py --model unet --device cpu --batch-size 8 [--steps 6] [--json]

Measures in one run, after warm-up, at --size x --size:
  train     the training step train.py runs (its precision and memory-layout defaults, Adam, its loss)
  baseline  the plain loop of the same model: fp32, NCHW, Adam, default DataLoader
  infer     the forward pass infer.py / evaluate.py run
  loader    the training DataLoader alone (augmentation included), over a preprocessed array folder
With --json the last line is one JSON object with train_slices_per_s, baseline_train_slices_per_s,
infer_slices_per_s and loader_slices_per_s.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.dataset import PairAugment, SliceArrayDataset  # noqa: E402
from models import build_model  # noqa: E402
from train import default_loss, output_channels  # noqa: E402
from utils.helpers import amp_dtype, autocast, cpu_has_bf16, resolve_device  # noqa: E402
from utils.inference import class_probs  # noqa: E402
from utils.losses import get_loss  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fake_processed(folder: Path, n: int, size: int) -> Path:
    """A preprocessed-folder look-alike (random arrays, one split) for timing the loader."""
    rng = np.random.default_rng(0)
    np.save(folder / "images.npy", rng.random((n, size, size), dtype=np.float32))
    np.save(folder / "lesion_masks.npy", (rng.random((n, size, size)) > 0.9).astype(np.uint8))
    meta = {"preprocessing": {"size": size, "norm": "window", "window": [-1000, 400]},
            "slices": [{"case": f"c{i // 32}", "z": i % 32} for i in range(n)]}
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "splits.json").write_text(json.dumps({"by": "slice", "train": list(range(n)), "val": [], "test": []}))
    return folder


def time_train(model, loader, criterion, device, dtype, fmt, steps: int, warmup: int) -> float:
    """Slices per second of optimizer steps over ``loader`` (data loading included)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    it, done, t0 = iter(loader), 0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        try:
            images, masks = next(it)
        except StopIteration:
            it = iter(loader)
            images, masks = next(it)
        images = images.to(device, non_blocking=True, memory_format=fmt)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, dtype):
            out = model(images)
        loss = criterion(out, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warmup:
            done += len(images)
    _sync(device)
    return done / (time.perf_counter() - t0)


@torch.no_grad()
def time_infer(model, batch: torch.Tensor, device, dtype, steps: int, warmup: int) -> float:
    model.eval()
    x = batch.to(device, memory_format=torch.channels_last)
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with autocast(device, dtype):
            class_probs(model(x), "lesion")
    _sync(device)
    return steps * len(batch) / (time.perf_counter() - t0)


def time_loader(loader, batches: int) -> float:
    t0, n = time.perf_counter(), 0
    for i, (images, _) in enumerate(loader):
        n += len(images)
        if i + 1 >= batches:
            break
    return n / (time.perf_counter() - t0)


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    device = resolve_device(args.device)
    dtype = amp_dtype(device, args.amp)
    loss_name = default_loss(args.model, "lesion")
    nc = output_channels(loss_name, "lesion")
    criterion = get_loss(loss_name, nc)
    n = max(args.batch_size * (args.steps + args.warmup + 2), 64)
    with tempfile.TemporaryDirectory() as tmp:
        fake_processed(Path(tmp), n, args.size)
        ds = SliceArrayDataset(tmp, "train", "lesion", PairAugment())
        plain_ds = SliceArrayDataset(tmp, "train", "lesion", PairAugment(intensity=False))
        loader = DataLoader(ds, args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                            pin_memory=device.type == "cuda")
        results = {"model": args.model, "device": str(device), "batch_size": args.batch_size, "size": args.size,
                   "amp": str(dtype).replace("torch.", "") if dtype else "fp32", "channels_last": args.channels_last,
                   "cpu_native_bf16": cpu_has_bf16(), "threads": torch.get_num_threads()}
        results["loader_slices_per_s"] = time_loader(loader, max(20, 2 * args.steps))

        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        model = build_model(args.model, 1, nc).to(device, memory_format=fmt)
        results["train_slices_per_s"] = time_train(model, loader, criterion, device, dtype, fmt, args.steps, args.warmup)
        batch = next(iter(loader))[0]
        results["infer_slices_per_s"] = time_infer(model, batch, device, dtype, args.steps, args.warmup)
        del model

        if not args.skip_baseline:
            base = build_model(args.model, 1, nc).to(device)
            base_loader = DataLoader(plain_ds, args.batch_size, shuffle=True, drop_last=True)
            results["baseline_train_slices_per_s"] = time_train(base, base_loader, criterion, device, None,
                                                                torch.contiguous_format, args.steps, args.warmup)
            results["speedup_vs_baseline"] = results["train_slices_per_s"] / results["baseline_train_slices_per_s"]
    print(f"{args.model} on {device} ({results['amp']}, channels_last={args.channels_last}, batch {args.batch_size}, "
          f"{args.size}x{args.size}, {results['threads']} threads)")
    for key in ("train_slices_per_s", "baseline_train_slices_per_s", "infer_slices_per_s", "loader_slices_per_s"):
        if key in results:
            print(f"  {key:<30}{results[key]:10.2f}")
    if "speedup_vs_baseline" in results:
        print(f"  {'speedup_vs_baseline':<30}{results['speedup_vs_baseline']:10.2f}x")
    if args.json:
        print(json.dumps(results))
    return results


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet", choices=("unet", "deeplabv3"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the project's loader")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--json", action="store_true")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
