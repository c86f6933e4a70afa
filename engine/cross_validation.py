"""K-fold cross-validation over a folder of image-mask pairs: one training run per fold (one after the other,
or ``--fold-jobs`` at a time in processes of their own), each fold's final model scored by
:func:`engine.evaluation.evaluate` on the pairs it did not train on."""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch

from base import InputError, exclusive_lock
from data.split_data import write_json
from engine.evaluation import evaluate
from engine.training import LOCK_HOLDER, TrainingInterrupted, build_datasets
from utils.cli import remembered_ctrl_c
from utils.metrics import finite_or_none, mean_sd

SCORES = ("dice", "iou", "dice_threshold_averaged")
# Per lesion type (types tasks, results["classes"]): mean per-image Dice over the images that contain the
# type, and Inf-Net's threshold-averaged Dice over all images (those without the type as 0, its protocol)
CLASS_SCORES = {"dice": "n", "dice_threshold_averaged": "n_images"}  # score: the count it is a mean over


def class_fold_scores(classes: dict) -> dict[str, dict[str, float]]:
    """One fold's per-class figures from results["classes"] (utils.metrics.ClassMeter.summary())."""
    out = {}
    for name, c in classes["classes"].items():
        dice, infnet = c["per_image"]["dice"], c["threshold_averaged_dice"] or {}
        out[name] = {"dice": dice["mean"], "n": dice["n"], "dice_threshold_averaged": infnet.get("mean"),
                     "n_images": infnet.get("n", 0)}
    return out


def class_summary(folds: list[dict[str, dict[str, float]]]) -> dict:
    """Per class: every fold's figures, their mean +- sd over folds, and the out-of-fold means (each fold's
    mean weighted by the images it is a mean over, so each image counts once)."""
    summary = {}
    for name in folds[0]:
        rows = [f[name] for f in folds]
        entry = {"folds": {k: [r[k] for r in rows] for k in (*CLASS_SCORES, *CLASS_SCORES.values())},
                 "mean_over_folds": {k: mean_sd(r[k] for r in rows) for k in CLASS_SCORES}, "out_of_fold": {}}
        for key, count in CLASS_SCORES.items():
            pairs = [(r[key], r[count]) for r in rows if r[key] is not None and r[count]]
            total = sum(n for _, n in pairs)
            entry["out_of_fold"][key] = sum(v * n for v, n in pairs) / total if total else float("nan")
        summary[name] = entry
    return summary


def cross_validate(args: argparse.Namespace, train: Callable[[argparse.Namespace], dict],
                   hold: contextlib.ExitStack | None = None) -> dict:
    """K-fold cross-validation: ``train(args)`` once per fold into OUT/fold<i>, each scored on its own
    validation part.

    Each fold's final model (last.pth, not the epoch that scored best on this very validation part, which
    would be a biased pick) is scored on the fold's validation pairs at their own resolution, with flip
    TTA if --tta: mean per-image Dice and IoU at 0.5 and Inf-Net's threshold-averaged Dice. OUT/cv.json
    holds every fold's figures, their mean +- sd over folds, and the out-of-fold means over all images
    (each image scored once, by the model that did not train on it). A types task adds "classes": the
    same per lesion type (:func:`class_summary`).

    With --resume OUT (the same folder as --out), each fold continues from its OUT/fold<i>/last.pth where it
    has one (a fold that holds all its epochs is only scored) and trains from the start where not. A Ctrl-C
    raises :class:`FoldsInterrupted`, which says where each running fold stopped and how to resume.

    Args:
        args: train.py's arguments, with --folds K.
        train: one training run (train.py's ``train``); returns {"best_dice", "val_pairs", ...}.
        hold: when given, OUT is locked against other train.py runs until ``hold`` closes.

    Returns:
        The cv.json summary plus "runs", what ``train`` returned for each fold.
    """
    resume_from = resume_points(args)
    if hold is not None and int(os.environ.get("RANK", "0")) == 0:
        build_datasets(args.data, args.task, args.size, args.val_fraction, args.seed, "none", args.folds, 0,
                       getattr(args, "look_window", None), getattr(args, "look_crop", None), log=lambda line: None,
                       other_labels=getattr(args, "other_labels", "background"),
                       train_subset=getattr(args, "train_subset", 0))
        Path(args.out).mkdir(parents=True, exist_ok=True)  # only once the data is known to be there
        hold.enter_context(exclusive_lock(args.out, LOCK_HOLDER))
    fold_args = [argparse.Namespace(**{**vars(args), "fold": i, "out": str(Path(args.out) / f"fold{i}"),
                                       "resume": resume_from[i]}) for i in range(args.folds)]
    jobs = getattr(args, "fold_jobs", 1)
    runs = train_in_parallel(train, fold_args, jobs) if jobs > 1 else train_in_turn(train, fold_args)
    scores, class_folds = {**{k: [] for k in SCORES}, "n": []}, []
    for a, run in zip(fold_args, runs):
        out = Path(a.out)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 scores
            continue
        res = evaluate(out / "last.pth", args.data, out=out / "eval-val", device=args.device, amp=args.amp,
                       batch_size=args.batch_size, progress=False, tta=args.tta, pairs=run["val_pairs"],
                       split="val")
        per_image = res["structures"]["lesion"]["per_image"]
        for key in SCORES:
            scores[key].append(per_image[key]["mean"])
        scores["n"].append(per_image["dice"]["n"])
        if "classes" in res:  # a types task: also per lesion type
            class_folds.append(class_fold_scores(res["classes"]))
    summary = {"folds": args.folds, "seed": args.seed, "tta": args.tta,
               **({"train_subset": args.train_subset} if getattr(args, "train_subset", 0) else {}),
               "best_val_dice": [r["best_dice"] for r in runs], "last_epoch": scores}
    if scores["n"]:
        n = np.array(scores["n"], dtype=np.float64)
        summary["mean_over_folds"] = {k: mean_sd(scores[k]) for k in SCORES}
        summary["out_of_fold"] = {k: float(np.nansum(np.array(scores[k]) * n) / n.sum()) for k in SCORES}
        if class_folds:
            summary["classes"] = class_summary(class_folds)
        summary = finite_or_none(summary)  # a fold without lesion has no Dice: null, not NaN, in the JSON
        write_json(Path(args.out) / "cv.json", summary)
        m = summary["mean_over_folds"]
        print(f"{args.folds}-fold cross-validation, final models{' with flip TTA' if args.tta else ''}, mean per-image "
              f"over folds: Dice {m['dice']['mean']:.4f} ± {m['dice']['sd'] or 0:.4f}, threshold-averaged Dice "
              f"{m['dice_threshold_averaged']['mean']:.4f} ± {m['dice_threshold_averaged']['sd'] or 0:.4f} (folds: "
              f"{', '.join(f'{d:.4f}' for d in scores['dice'])}); {args.out}/cv.json, models {args.out}/fold*/last.pth")
        for name, c in summary.get("classes", {}).items():
            m = c["mean_over_folds"]
            print(f"  {name}: per-image Dice over the slices with it {_fmt(m['dice'])}, "
                  f"Inf-Net threshold-averaged Dice {_fmt(m['dice_threshold_averaged'])} (mean ± sd over folds)")
    return {**summary, "runs": runs}


def _fmt(m: dict) -> str:
    return "-" if m["mean"] is None else f"{m['mean']:.4f} ± {m['sd'] or 0:.4f}"


def resume_points(args: argparse.Namespace) -> list[str | None]:
    """Each fold's checkpoint to continue from under --resume OUT (OUT/fold<i>/last.pth, or None where the fold
    has none and trains from the start); all None without --resume. Raises InputError when --resume names
    anything but the cross-validation's own folder, or one where no fold has a last.pth."""
    if not getattr(args, "resume", None):
        return [None] * args.folds
    cv = Path(args.resume)
    if not cv.is_dir():
        raise InputError(f"--resume {cv}: with --folds {args.folds} (every fold) it takes the cross-validation's "
                         f"folder, where each fold continues from its own fold<i>/last.pth; to resume one fold "
                         f"from a checkpoint, add --fold I")
    if cv.resolve() != Path(args.out).resolve():
        raise InputError(f"--resume {cv} continues the cross-validation in {cv}, but --out is {args.out}: give "
                         f"--out {cv} as well")
    points = [cv / f"fold{i}" / "last.pth" for i in range(args.folds)]
    if not any(p.is_file() for p in points):
        raise InputError(f"--resume {cv}: no fold there has a last.pth to resume from (looked for "
                         f"fold0/last.pth .. fold{args.folds - 1}/last.pth); start it without --resume")
    return [str(p) if p.is_file() else None for p in points]


class FoldsInterrupted(KeyboardInterrupt):
    """Ctrl-C during a cross-validation. Its message: where each running fold stopped (``stopped``: fold ->
    its KeyboardInterrupt), the folds not started, and how to resume the whole cross-validation in ``out``
    when any fold there has a last.pth."""

    def __init__(self, out: Path, folds: int, stopped: dict[int, BaseException], not_started: list[int]):
        lines = _stopped_lines(stopped, not_started)
        if any((out / f"fold{i}" / "last.pth").is_file() for i in range(folds)):
            lines.append(f"resume the cross-validation with the same command and --resume {out}")
        super().__init__("\n".join(lines) or "interrupted")


def _stopped_lines(stopped: dict[int, BaseException], not_started: list[int]) -> list[str]:
    lines = [f"fold {i}: {e.stopped() if isinstance(e, TrainingInterrupted) else str(e) or 'interrupted'}"
             for i, e in sorted(stopped.items())]
    return lines + ([f"not started: fold {', '.join(map(str, not_started))}"] if not_started else [])


def train_in_turn(train: Callable[[argparse.Namespace], dict], fold_args: list[argparse.Namespace]) -> list[dict]:
    """``train(a)`` for every ``a`` of ``fold_args``, one after the other; a Ctrl-C raises FoldsInterrupted."""
    runs = []
    for n, a in enumerate(fold_args):
        try:
            runs.append(train(a))
        except KeyboardInterrupt as e:
            raise FoldsInterrupted(Path(a.out).parent, len(fold_args), {a.fold: e},
                                   [b.fold for b in fold_args[n + 1:]]) from None
    return runs


# ----------------------------------------------------------------------------- folds side by side (--fold-jobs)
# Each fold is a spawned process in a process group of its own: the terminal's Ctrl-C reaches this process only,
# which passes one SIGINT on to every running fold, so a fold is not interrupted a second time while it reports
# where it stopped. A fold whose parent dies (killed) stops itself the same way rather than train on, orphaned.
# When no fold is left to start, the threads of those that end go to those still running: the parent writes
# the new share and sends SIGUSR1, whose handler sets it between two operations of the fold's main thread.


# what a fold sends back as it is (utils.cli.run_cli shows them as one line); anything else goes back as a
# RuntimeError with its text, since the parent could not rebuild every exception class from a pickle
USER_ERRORS = (InputError, OSError, FloatingPointError, KeyboardInterrupt)


def train_in_parallel(train: Callable[[argparse.Namespace], dict], fold_args: list[argparse.Namespace],
                      jobs: int) -> list[dict]:
    """``train(a)`` for every ``a`` of ``fold_args``, ``jobs`` at a time, each in a spawned process with an equal
    share of this process's CPU threads and its output lines prefixed "fold <i>: ".

    A fold that fails stops the others at their next step (each saves as after a Ctrl-C) and its exception is
    raised here, after their lines; a Ctrl-C here stops them all and raises one FoldsInterrupted (each fold's
    line: where it stopped; the folds not started; how to resume).

    Returns what ``train`` returned, in the order of ``fold_args``.
    """
    threads, jobs = torch.get_num_threads(), min(jobs, len(fold_args))
    spawn = multiprocessing.get_context("spawn")
    share = spawn.RawValue("i", max(1, threads // jobs))  # each running fold's CPU threads
    todo, running, results, errors = list(enumerate(fold_args)), {}, {}, {}
    interrupted = False

    def start(i: int, a: argparse.Namespace) -> None:
        receive, send = spawn.Pipe(duplex=False)
        process = spawn.Process(target=_fold_process, args=(train, a, share, send), name=f"fold{a.fold}")
        previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited: ignored until the fold handles it
        try:
            process.start()
        finally:
            signal.signal(signal.SIGUSR1, previous)
        send.close()  # only the child holds it now: a child that dies unannounced closes it
        running[i] = (process, receive)
        print(f"fold {a.fold}: started ({share.value} CPU thread{'s' * (share.value > 1)}, {jobs} folds at a time)",
              flush=True)

    def rebalance() -> None:  # no fold left to start: the running ones share all the threads
        each = max(1, threads // max(1, len(running)))
        if not todo and running and share.value != each:
            share.value = each
            for process, _ in running.values():
                os.kill(process.pid, signal.SIGUSR1)
            print(f"{', '.join(f'fold {fold_args[i].fold}' for i in running)}: {share.value} CPU threads now",
                  flush=True)

    def collect(i: int) -> None:
        process, receive = running[i]
        try:
            kind, value = receive.recv()
        except EOFError:
            process.join()
            code = process.exitcode
            kind, value = "error", ChildProcessError(
                f"fold {fold_args[i].fold} ended without a result (exit code {code}"
                + (f": killed by signal {-code}, perhaps for want of memory)" if code < 0 else ")"))
        process.join()
        receive.close()
        del running[i]
        if kind == "done":
            results[i] = value
            print(f"fold {fold_args[i].fold}: done", flush=True)
        else:
            if not errors:
                _stop(running)
            errors[i] = value

    try:
        while running or (todo and not errors):
            while todo and len(running) < jobs and not errors:
                start(*todo.pop(0))
            ready = wait([receive for _, receive in running.values()])
            for i in [i for i, (_, receive) in running.items() if receive in ready]:
                collect(i)
            if not errors:
                rebalance()
    except KeyboardInterrupt:
        interrupted = True
        _stop(running)
        for i in list(running):
            collect(i)
    if not errors and not interrupted:
        return [results[i] for i in range(len(fold_args))]
    stopped = {fold_args[i].fold: e for i, e in errors.items() if isinstance(e, KeyboardInterrupt)}
    not_started = [a.fold for _, a in todo]
    cause = next((e for e in errors.values() if not isinstance(e, KeyboardInterrupt)), None)
    if cause is None:
        raise FoldsInterrupted(Path(fold_args[0].out).parent, len(fold_args), stopped, not_started)
    print("\n".join(_stopped_lines(stopped, not_started)), file=sys.stderr, flush=True)
    raise cause


def _stop(running: dict) -> None:
    """One SIGINT to each running fold; each stops at its next step and saves."""
    for process, _ in running.values():
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)


def _fold_process(train: Callable, args: argparse.Namespace, share, send) -> None:
    """A fold's process: train with ``share.value`` CPU threads (re-read on SIGUSR1) and send ("done", result)
    or ("error", exception)."""
    os.setpgrp()  # the terminal's Ctrl-C goes to the parent, which passes it on once
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the parent's is ignored (nohup)
    signal.signal(signal.SIGUSR1, lambda signum, frame: torch.set_num_threads(share.value))
    torch.set_num_threads(share.value)
    prefix = f"fold {args.fold}: "
    sys.stdout, sys.stderr = _Prefixed(sys.stdout, prefix), _Prefixed(sys.stderr, prefix)
    threading.Thread(target=_stop_with_parent, daemon=True).start()
    try:
        with remembered_ctrl_c():
            message = ("done", train(args))
    except BaseException as e:  # noqa: B036 - every ending goes back to the parent, Ctrl-C included
        user = isinstance(e, USER_ERRORS)
        if not user or args.debug:
            traceback.print_exc()  # a bug: its traceback here, since the parent raises only the exception
        message = ("error", e if user else RuntimeError(f"fold {args.fold}: {type(e).__name__}: {e} (traceback above)"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    with contextlib.suppress(BrokenPipeError):  # the parent is gone (killed): there is no one to tell
        send.send(message)
    send.close()


def _stop_with_parent() -> None:
    """Stop this fold (as a Ctrl-C would) if the parent process dies, rather than train on, orphaned."""
    wait([multiprocessing.parent_process().sentinel])
    os.kill(os.getpid(), signal.SIGINT)


class _Prefixed:
    """A text stream that writes whole lines only, each with a prefix: the folds' lines do not interleave."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:
            self.stream.write("".join(f"{self.prefix}{line}\n" for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.write("\n")
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)
