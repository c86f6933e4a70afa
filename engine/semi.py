"""Semi-supervised training on slices without masks (train.py --unlabeled DIR).

Every training step adds a batch of unlabelled slices to the labelled one. A teacher, the exponential
moving average (EMA) of the student's weights (Tarvainen & Valpola 2017, "mean teacher"), predicts on a
weakly augmented view (flips, 90-degree turns); the student sees a strongly augmented view of the same
slices (stronger intensity jitter, noise, and CutMix between the slices of the batch, French et al. 2020),
and learns to agree with the teacher. Weak and strong views share their geometry, so the teacher's map is
the strong view's target pixel for pixel (CutMix moves the targets with the pixels). Two ways to agree:

    mean-teacher  mean squared error between the student's and the teacher's probabilities, every pixel
    fixmatch      cross-entropy to the teacher's label where its probability of that label is at least
                  --confidence (Sohn et al. 2020, with the EMA teacher of UniMatch / U2PL-style methods;
                  --ema-decay 0 makes the teacher the student itself, as in FixMatch)

The unlabelled loss is weighed by --unlabeled-weight, ramped up as exp(-5 (1 - t)^2) over the first
RAMP_SHARE of the steps (the mean teacher's schedule): early on the teacher knows nothing worth copying.
The teacher is what validation scores and what the checkpoint's "model" holds (infer.py and evaluate.py
use it); the student's weights and the step count ride along for --resume.

Self-training (--teacher CKPT): the teacher is a fixed, already trained model (the supervised recipe's
fold model, say), not the student's average; it never moves, and the student is what is scored and saved.
Semi-Inf-Net's pseudo-labels came from such a teacher, in rounds.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from data.augment import BatchAugment, intensity_jitter, to_device
from utils.helpers import autocast

SEMI_METHODS = ("mean-teacher", "fixmatch")
RAMP_SHARE = 0.2  # share of the training steps over which the unlabelled loss weight ramps up
EMA_WARMUP = 10  # the EMA decay is min(decay, (1 + step) / (EMA_WARMUP + step)): the teacher follows at first
CUTMIX_P = 0.5  # probability that a slice gets a box of another slice of the batch pasted in
CUTMIX_AREA = (0.1, 0.4)  # the box's share of the slice's area
NOISE_SD = 0.04  # maximum standard deviation of the strong view's Gaussian noise (images in [0, 1])


def main_output(outputs):
    """The main logits of a model's training output (a tensor, or DeepLabV3's list [main, aux])."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def split_outputs(outputs, n: int):
    """Training outputs of a labelled + unlabelled batch -> (outputs of the first ``n`` items, in the
    structure the criterion takes; main logits of the rest)."""
    if isinstance(outputs, (list, tuple)):
        return [o[:n] for o in outputs], outputs[0][n:]
    return outputs[:n], outputs[n:]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities of logits (N, C, H, W): sigmoid for one channel (binary), else softmax."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)


def strong_view(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The strong view of a batch of weak views, and the teacher's maps moved with its pixels.

    Intensity jitter wider than --augment basic's (contrast 0.7-1.3, brightness +-0.1, gamma 0.7-1.5, every
    slice), Gaussian noise, and CutMix: with probability CUTMIX_P a slice gets a random box of the next
    slice of the batch (and its targets the same box of that slice's targets). Draws from torch's CPU
    generator, as the other augmentations.

    Shape: images (N, 1, H, W) in [0, 1], targets (N, C, H, W) -> the same.
    """
    n, _, h, w = images.shape
    u = to_device(torch.rand(8, n), images.device)
    contrast, brightness, gamma = 0.7 + 0.6 * u[0], 0.2 * (u[1] - 0.5), 0.7 + 0.8 * u[2]
    view = lambda t: t.view(-1, 1, 1, 1)  # noqa: E731
    out = intensity_jitter(images.float(), view(contrast), view(brightness), view(gamma))
    out = (out + view(NOISE_SD * u[3]) * torch.randn_like(out)).clamp(0, 1)
    if n > 1:
        area = CUTMIX_AREA[0] + (CUTMIX_AREA[1] - CUTMIX_AREA[0]) * u[4]
        bh, bw = (area.sqrt() * h).round().long(), (area.sqrt() * w).round().long()
        y0, x0 = (u[5] * (h - bh + 1)).long().clamp(max=h - 1), (u[6] * (w - bw + 1)).long().clamp(max=w - 1)
        ys, xs = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
        inside = (((ys[None] >= y0[:, None]) & (ys[None] < (y0 + bh)[:, None]))[:, :, None]
                  & ((xs[None] >= x0[:, None]) & (xs[None] < (x0 + bw)[:, None]))[:, None, :])
        box = (inside & (u[7] < CUTMIX_P)[:, None, None])[:, None]  # (N, 1, H, W)
        out = torch.where(box, out.roll(1, 0), out)
        targets = torch.where(box, targets.roll(1, 0), targets)
    return out.to(images.dtype), targets


def unlabeled_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, method: str,
                   confidence: float) -> torch.Tensor:
    """The student's disagreement with the teacher on unlabelled pixels, a mean over all of them.

    mean-teacher: squared difference of the class probabilities (summed over classes). fixmatch: binary or
    categorical cross-entropy to the teacher's most probable class, where that class's probability is at
    least ``confidence`` (0 elsewhere; the mean still counts those pixels, so an unsure teacher teaches less).

    Shape: student_logits (N, C, H, W), teacher_probs (N, C, H, W) (C = 1: sigmoid; else softmax).
    """
    if method == "mean-teacher":
        return ((probabilities(student_logits) - teacher_probs) ** 2).sum(1).mean()
    logits = student_logits.float()
    if logits.shape[1] == 1:
        label = (teacher_probs > 0.5).float()
        sure = torch.maximum(teacher_probs, 1 - teacher_probs) >= confidence
        loss = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    else:
        top, label = teacher_probs.max(1, keepdim=True)
        sure = top >= confidence
        loss = F.cross_entropy(logits, label[:, 0], reduction="none")[:, None]
    return (loss * sure).mean()


class SemiSupervised:
    """The teacher of a semi-supervised run and what one step does with an unlabelled batch.

    Args:
        model: the student, unwrapped (the module DDP or torch.compile wrap); the teacher starts as its copy.
        method: one of SEMI_METHODS.
        weight: the unlabelled loss's weight after the ramp-up.
        total_steps: the run's optimizer steps (for the ramp-up).
        ema_decay: the teacher's EMA decay per step (0: the teacher is the student).
        confidence: fixmatch's threshold on the teacher's probability.
        teacher: a fixed teacher (self-training), on the training device; None: the student's EMA.
    """

    def __init__(self, model: torch.nn.Module, method: str, weight: float, total_steps: int,
                 ema_decay: float = 0.99, confidence: float = 0.95, teacher: torch.nn.Module | None = None):
        if method not in SEMI_METHODS:
            raise ValueError(f"method must be one of {SEMI_METHODS}, got {method!r}")
        if not 0 <= ema_decay < 1 or not 0.5 <= confidence <= 1 or weight < 0:
            raise ValueError(f"bad semi-supervised parameters: ema_decay={ema_decay} (0 <= d < 1), "
                             f"confidence={confidence} (0.5..1), weight={weight} (>= 0)")
        self.method, self.weight, self.total_steps = method, weight, max(1, total_steps)
        self.ema_decay, self.confidence = ema_decay, confidence
        self.fixed = teacher is not None
        self.student = model
        self.teacher = (teacher if self.fixed else copy.deepcopy(model)).eval().requires_grad_(False)
        self.step = 0  # optimizer steps taken so far
        self.weak = BatchAugment(intensity=False)

    def ramp(self) -> float:
        """The unlabelled loss weight's ramp-up factor at this step, in [0, 1]."""
        t = min(1.0, self.step / max(1.0, RAMP_SHARE * self.total_steps))
        return math.exp(-5 * (1 - t) ** 2)

    def loss(self, student, images: torch.Tensor, unlabeled: torch.Tensor, device: torch.device, dtype, fmt,
             criterion, masks: torch.Tensor) -> torch.Tensor:
        """The step's loss: the labelled criterion plus the weighed unlabelled loss, with one forward pass
        of the student over both batches (batch norm sees them together, as FixMatch's).

        Shape: images (N, C, H, W), masks (N, H, W) labelled on ``device``; unlabeled (M, C, H, W).
        """
        unlabeled = unlabeled.to(device, non_blocking=True)
        # the weak view's masks are not used: BatchAugment turns image and mask together
        weak, _ = self.weak(unlabeled, torch.zeros(unlabeled.shape[0], *unlabeled.shape[2:], dtype=torch.uint8,
                                                   device=device))
        with torch.no_grad(), autocast(device, dtype):
            targets = probabilities(main_output(self.teacher(weak.contiguous(memory_format=fmt))))
        strong, targets = strong_view(weak, targets)
        batch = torch.cat([images, strong]).contiguous(memory_format=fmt)
        with autocast(device, dtype):
            outputs = student(batch)
        labelled, student_logits = split_outputs(outputs, len(images))
        sup = criterion(labelled, masks)
        unsup = unlabeled_loss(student_logits, targets, self.method, self.confidence)
        return sup + self.weight * self.ramp() * unsup

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: the teacher moves towards the student (floating-point parameters and
        buffers by EMA, batch-norm counters copied)."""
        self.step += 1
        if self.fixed:
            return
        decay = min(self.ema_decay, (1 + self.step) / (EMA_WARMUP + self.step))
        teacher = self.teacher.state_dict()
        for name, value in self.student.state_dict().items():
            if value.is_floating_point():
                teacher[name].lerp_(value, 1 - decay)
            else:
                teacher[name].copy_(value)

    def state_dict(self) -> dict:
        """The step count, and the teacher's weights unless it is fixed (its file holds them)."""
        return {"step": self.step} if self.fixed else {"teacher": self.teacher.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if not self.fixed:
            self.teacher.load_state_dict(state["teacher"])
        self.step = int(state["step"])
