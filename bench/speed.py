"""Training, inference and data-loading throughput of the project's code, beside a plain baseline.

    python bench/speed.py --model unet --device cpu --batch-size 8 [--steps 6] [--json]
    python bench/speed.py --model unet --device cuda --batch-size 128 --steps 30 --compile --json

Measures in one run, after warm-up, at --size x --size:
  train     the training step train.py runs (its precision, memory-layout and data-placement defaults, Adam,
            its loss, its augmentation; --compile as train.py --compile)
  baseline  the plain loop of the same model: fp32, NCHW, Adam, default DataLoader
  infer     the forward pass infer.py / evaluate.py run
  loader    the training data path alone, augmentation included, over a preprocessed array folder: the
            DataLoader, or with the data on the device (train.py's default on CUDA) its batches and BatchAugment
  MFU       model FLOP utilisation: the training step's FLOPs (counted by torch's FlopCounterMode, forward and
            backward) per second, over the peak of a large matrix multiply in the same precision, timed in
            the same run on the same device
With --json the last line is one JSON object with train_slices_per_s, baseline_train_slices_per_s,
infer_slices_per_s, loader_slices_per_s, train_gflop_per_slice, matmul_peak_tflops and mfu.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.augment import BatchAugment  # noqa: E402
from data.dataset import DeviceLoader, PairAugment, SliceArrayDataset  # noqa: E402
from engine.predict import class_probs  # noqa: E402
from engine.training import build_loss, data_on_device, default_loss, make_scheduler, train_step  # noqa: E402
from models import build_model, model_options  # noqa: E402
from utils.helpers import amp_dtype, autocast, cpu_has_bf16, resolve_device, seed_everything  # noqa: E402


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


def next_batch(it, loader, device, augments=()):
    """The next batch on ``device``, augmented as train.py does, restarting the loader when it runs out."""
    try:
        images, masks = next(it)
    except StopIteration:
        it = iter(loader)
        images, masks = next(it)
    images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
    for augment in augments:
        images, masks = augment(images, masks)
    return it, images, masks


def time_train(model, loader, criterion, device, dtype, fmt, steps: int, warmup: int, augments=()) -> float:
    """Slices per second of train.py's optimizer step (engine.training.train_step: Adam at a constant rate,
    a GradScaler where fp16 runs) over ``loader``, data loading and augmentation included."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    sched = make_scheduler(opt, "none", steps + warmup, 0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
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
        _, n = train_step(model, criterion, opt, sched, scaler, images, masks, device, dtype, fmt, augments)
        if step >= warmup:
            done += n
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


def time_loader(loader, device, batches: int, augments=()) -> float:
    it, n = iter(loader), 0
    t0 = time.perf_counter()
    for _ in range(batches):
        it, images, _ = next_batch(it, loader, device, augments)
        n += len(images)
    _sync(device)
    return n / (time.perf_counter() - t0)


def train_flops(model, images, masks, criterion, device, dtype) -> float:
    """FLOPs of one forward and backward pass over the batch (matrix multiplies and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        with autocast(device, dtype):
            out = model(images)
        criterion(out, masks).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_peak(device, dtype, size: int, reps: int) -> float:
    """FLOP/s of a size x size matrix multiply in ``dtype`` (fp32 when None), the fastest of ``reps``
    timings: the device's practical peak (the best, not the mean, since a shared machine only slows it)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype or torch.float32) for _ in range(2))
    a @ b
    best = math.inf
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def main(args: argparse.Namespace) -> dict:
    seed_everything(0)  # as train.py: cuDNN autotuning on
    device = resolve_device(args.device)
    dtype = amp_dtype(device, args.amp)
    criterion, nc = build_loss(default_loss(args.model, "lesion"), "lesion")
    kwargs = model_options(args.model, width=args.width)
    # enough slices for a few distinct batches; the loaders cycle through them
    n = min(max(args.batch_size * (args.steps + args.warmup + 2), 64), max(4096, 2 * args.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        fake_processed(Path(tmp), n, args.size)
        ds = SliceArrayDataset(tmp, "train", "lesion", PairAugment())
        plain_ds = SliceArrayDataset(tmp, "train", "lesion", PairAugment(intensity=False))
        on_device = data_on_device(args.data_on_device, device, ds)
        if on_device:  # as train.py: the arrays on the device, flips/turns/jitter per batch there
            loader = DeviceLoader(SliceArrayDataset(tmp, "train", "lesion"), args.batch_size, RandomSampler(ds),
                                  device, drop_last=True, progress=False)
            augments = [BatchAugment()]
        else:
            loader = DataLoader(ds, args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                                pin_memory=device.type == "cuda")
            augments = []
        results = {"model": args.model, **kwargs, "device": str(device), "batch_size": args.batch_size,
                   "size": args.size, "amp": str(dtype).replace("torch.", "") if dtype else "fp32",
                   "channels_last": args.channels_last,
                   "data_on_device": on_device, "compile": args.compile, "cpu_native_bf16": cpu_has_bf16(),
                   "threads": torch.get_num_threads(),
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
        results["loader_slices_per_s"] = time_loader(loader, device, max(20, 2 * args.steps), augments)

        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        model = build_model(args.model, 1, nc, **kwargs).to(device, memory_format=fmt)
        _, images, masks = next_batch(iter(loader), loader, device, augments)
        images = images.contiguous(memory_format=fmt)
        flops = train_flops(model, images, masks, criterion, device, dtype) / len(images)
        net = torch.compile(model) if args.compile else model
        results["train_slices_per_s"] = time_train(net, loader, criterion, device, dtype, fmt, args.steps,
                                                   args.warmup, augments)
        results["infer_slices_per_s"] = time_infer(net, images, device, dtype, args.steps, args.warmup)
        del model, net
        big = args.matmul_size or (8192 if device.type == "cuda" else 4096)
        peak = matmul_peak(device, dtype, big, 50 if device.type == "cuda" else 10)
        results.update({"train_gflop_per_slice": flops / 1e9, "matmul_peak_tflops": peak / 1e12,
                        "train_tflops": results["train_slices_per_s"] * flops / 1e12,
                        "mfu": results["train_slices_per_s"] * flops / peak, "bound_slices_per_s": peak / flops})

        if not args.skip_baseline:
            base = build_model(args.model, 1, nc, **kwargs).to(device)
            base_loader = DataLoader(plain_ds, args.batch_size, shuffle=True, drop_last=True)
            results["baseline_train_slices_per_s"] = time_train(base, base_loader, criterion, device, None,
                                                                torch.contiguous_format, args.steps, args.warmup)
            results["speedup_vs_baseline"] = results["train_slices_per_s"] / results["baseline_train_slices_per_s"]
    name = f"{args.model} width {args.width}" if kwargs else args.model
    print(f"{name} on {results['gpu'] or device} ({results['amp']}, channels_last={args.channels_last}, data on "
          f"device={on_device}, compile={args.compile}, batch {args.batch_size}, {args.size}x{args.size}, "
          f"{results['threads']} threads)")
    for key in ("train_slices_per_s", "baseline_train_slices_per_s", "infer_slices_per_s", "loader_slices_per_s"):
        if key in results:
            print(f"  {key:<30}{results[key]:10.2f}")
    if "speedup_vs_baseline" in results:
        print(f"  {'speedup_vs_baseline':<30}{results['speedup_vs_baseline']:10.2f}x")
    print(f"  MFU {100 * results['mfu']:.1f}%: {results['train_tflops']:.3g} of {results['matmul_peak_tflops']:.3g} "
          f"TFLOP/s ({results['train_gflop_per_slice']:.1f} GFLOP per training slice; the matmul peak bounds "
          f"training at {results['bound_slices_per_s']:.1f} slices/s)")
    if args.json:
        print(json.dumps(results))
    return results


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet", choices=("unet", "deeplabv3"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--width", type=int, default=32, help="U-Net base width (train.py --width)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the project's loader")
    p.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=None,
                   help="the project's data path: arrays held on the device (default: as train.py, on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the project's model (warm-up then includes compiling)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="side of the matrices whose product gives the peak for MFU (default 4096 on CPU, 8192 on "
                        "CUDA; 11 products of 4096 take about 14 s on a 2-core CPU without bf16, smaller ones "
                        "reach less of the peak)")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--json", action="store_true")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
