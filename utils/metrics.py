"""Binary segmentation metrics from TP/FP/FN/TN counts accumulated over a whole set.

Zero-denominator rule: a ratio whose denominator is 0 (e.g. precision when nothing is predicted) is
float('nan'), never a silent 0 or 1.
Empty-ground-truth rule: Dice/IoU are undefined on an image (or patient) with no foreground, so those
are reported separately (how many have false positives) and left out of the Dice/IoU means.
For a multi-class task, score each class k on the binary masks `pred == k`, `target == k`.
"""

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

# Equal-width probability bins in [0, 1] for the AUC histograms; AUC is exact up to this resolution.
AUC_BINS = 1000


def confusion_counts(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image binary confusion counts.

    Args:
        pred: predicted foreground mask, bool or integer in {0, 1}.
        target: ground-truth foreground mask, bool or integer in {0, 1}.

    Shape: pred and target (N, H, W).

    Returns:
        int64 tensor (N, 4) of [tp, fp, fn, tn] per image, on the inputs' device.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred is {tuple(pred.shape)} and target is {tuple(target.shape)}; both must be the same (N, H, W)"
        )
    for label, mask in (("pred", pred), ("target", target)):
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{label} must be a bool or integer mask, got {mask.dtype}; threshold probabilities first")
        # A 3-class label map here would silently merge lung and lesion; this check is a GPU sync point.
        if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{label} must be a binary mask in {{0, 1}}; pass `mask == k` for class k")
    p = pred.bool().flatten(1)
    t = target.bool().flatten(1)
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    tn = p.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=1).long()


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def metrics_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """Dice, IoU, precision, recall, specificity, accuracy and F1 (= Dice) from confusion counts.

    Returns:
        dict of floats; nan where the denominator is 0.
    """
    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "dice": dice,
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "f1": dice,  # identical for a binary task; both keys kept for readers of either vocabulary
    }


# The figures reported per image and per patient (all of metrics_from_counts).
METRICS = ("dice", "iou", "precision", "recall", "specificity", "accuracy", "f1")
# Undefined on an empty ground truth (nothing to overlap or to recall): nan there, see the module rule.
OVERLAP_METRICS = ("dice", "iou", "f1", "recall")


def _scores(counts: Sequence[int]) -> dict:
    """Every metric of one image or patient, overlap metrics nan when its ground truth is empty, plus the counts."""
    tp, fp, fn, tn = (int(c) for c in counts)
    empty_gt = tp + fn == 0
    scores = metrics_from_counts(tp, fp, fn, tn)
    if empty_gt:
        scores.update({k: float("nan") for k in OVERLAP_METRICS})
    return {**scores, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "empty_gt": empty_gt}


def mean_sd(values: Iterable[float | None]) -> dict:
    """Mean and sample SD (ddof=1) of the defined values: None and nan (undefined figures) are left out.

    The one rule for few values: no values -> mean nan, sd nan; one value -> sd nan (a sample SD needs
    two). n counts the values used. :func:`finite_or_none` writes nan as JSON null.

    Returns:
        {"mean": float, "sd": float, "n": int}
    """
    vals = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    return {"mean": float(vals.mean()) if len(vals) else float("nan"),
            "sd": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"), "n": int(len(vals))}


def finite_or_none(obj):
    """Undefined figures (nan) become JSON null, so strict JSON readers accept results.json."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _aggregate(rows: list[dict]) -> dict[str, dict]:
    """:func:`mean_sd` of every metric over rows (images or patients); {metric: {"mean", "sd", "n"}}."""
    return {k: mean_sd(r[k] for r in rows) for k in METRICS}


def histogram_auc(pos_hist: Tensor, neg_hist: Tensor) -> float:
    """ROC AUC from per-bin counts of positive and negative pixels over equal bins in [0, 1].

    Exact up to the bin resolution: scores in the same bin are ties, and a tied positive/negative pair
    counts one half. Returns nan if either class is absent.
    """
    pos = pos_hist.double().numpy()
    neg = neg_hist.double().numpy()
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    bins = len(pos)
    centres = (np.arange(bins) + 0.5) / bins
    y_true = np.concatenate([np.zeros(bins), np.ones(bins)])
    score = np.concatenate([centres, centres])
    return float(roc_auc_score(y_true, score, sample_weight=np.concatenate([neg, pos])))


class SegmentationMeter:
    """Accumulates binary segmentation results over a whole set (pooled, per image, per patient, AUC).

    Memory is bounded: per image only its 4 counts are kept, and AUC uses two AUC_BINS histograms.
    """

    def __init__(self) -> None:
        self._image_counts: list[Tensor] = []  # (N, 4) int64 on CPU per update
        self._cases: list[str | None] = []
        self._pos_hist = torch.zeros(AUC_BINS, dtype=torch.int64)
        self._neg_hist = torch.zeros(AUC_BINS, dtype=torch.int64)

    def update(
        self, probs: Tensor, target: Tensor, threshold: float = 0.5, cases: Sequence[str] | None = None
    ) -> None:
        """Add a batch.

        Args:
            probs: foreground probabilities in [0, 1] (apply sigmoid/softmax first).
            target: ground-truth foreground mask in {0, 1}.
            threshold: a pixel is predicted foreground when prob > threshold.
            cases: optional patient/volume id per image, for the per-patient summary.

        Shape: probs and target (N, H, W).
        """
        if not probs.dtype.is_floating_point:
            raise TypeError(f"probs must be floating point probabilities, got {probs.dtype}")
        if probs.shape != target.shape or probs.ndim != 3:
            raise ValueError(
                f"probs is {tuple(probs.shape)} and target is {tuple(target.shape)}; both must be the same (N, H, W)"
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if cases is not None and len(cases) != probs.shape[0]:
            raise ValueError(f"got {len(cases)} case ids for a batch of {probs.shape[0]} images")
        low, high = torch.aminmax(probs.detach())
        # Out-of-range values (e.g. logits) would fall outside the AUC bins; checking them is a GPU sync point.
        if low < 0 or high > 1:
            raise ValueError(
                f"probs must lie in [0, 1], got range [{low.item():.4g}, {high.item():.4g}]; apply sigmoid/softmax"
            )

        counts = confusion_counts(probs > threshold, target)
        self._image_counts.append(counts.cpu())
        self._cases.extend(cases if cases is not None else [None] * probs.shape[0])

        bins = (probs.detach().float() * AUC_BINS).long().clamp_(max=AUC_BINS - 1)
        # One bincount over (label, bin) pairs instead of two boolean-masked ones (masking syncs on GPU).
        joint = torch.bincount((bins + AUC_BINS * target.bool().long()).flatten(), minlength=2 * AUC_BINS).cpu()
        self._neg_hist += joint[:AUC_BINS]
        self._pos_hist += joint[AUC_BINS:]

    def _counts(self) -> Tensor:
        if not self._image_counts:
            return torch.zeros(0, 4, dtype=torch.int64)
        return torch.cat(self._image_counts)

    def pooled(self) -> dict:
        """Metrics of the counts summed over every pixel of the set (see `metrics_from_counts`), plus tp/fp/fn/tn."""
        tp, fp, fn, tn = (int(c) for c in self._counts().sum(0))
        return {**metrics_from_counts(tp, fp, fn, tn), "tp": tp, "fp": fp, "fn": fn, "tn": tn}

    def per_image(self) -> list[dict]:
        """One dict per image: every metric of METRICS (dice, iou, f1 and recall nan if empty_gt), tp, fp, fn,
        tn, empty_gt, case (None if not given)."""
        return [{**_scores(c.tolist()), "case": case} for c, case in zip(self._counts(), self._cases)]

    def summary(self) -> dict:
        """Everything accumulated.

        Returns:
            dict with
            "pooled": `pooled()`;
            "per_image": {metric: {"mean", "sd", "n"}} for every metric of METRICS, over the images where
                it is defined (see :func:`mean_sd`; Dice and IoU over images with non-empty ground truth);
            "empty_gt": {n, n_with_false_positive, fraction_clean} over images with empty ground truth;
            "per_patient": None if no case ids were given, else the same aggregate over patients (Dice of
                each patient's summed counts, patients without any lesion excluded), plus "cases":
                {case: per-patient dict as in `per_image`}; images without a case id are left out;
            "auc": pixel ROC AUC from the histograms (nan if one class is absent).
        """
        images = self.per_image()
        empty = [r for r in images if r["empty_gt"]]
        n_fp = sum(r["fp"] > 0 for r in empty)

        per_patient = None
        patient_counts: dict[str, np.ndarray] = {}
        for r in images:
            if r["case"] is not None:
                counts = np.array([r["tp"], r["fp"], r["fn"], r["tn"]], dtype=np.int64)
                patient_counts[r["case"]] = patient_counts.get(r["case"], 0) + counts
        if patient_counts:
            cases = {case: _scores(counts) for case, counts in patient_counts.items()}
            per_patient = {**_aggregate(list(cases.values())), "cases": cases}

        return {
            "pooled": self.pooled(),
            "per_image": _aggregate(images),
            "empty_gt": {
                "n": len(empty),
                "n_with_false_positive": n_fp,
                "fraction_clean": _ratio(len(empty) - n_fp, len(empty)),
            },
            "per_patient": per_patient,
            "auc": histogram_auc(self._pos_hist, self._neg_hist),
        }


# Fan et al. 2020 (Inf-Net) score a probability map at 256 thresholds of its min-max-rescaled values.
INFNET_THRESHOLDS = 256


def threshold_averaged_dice(prob, target, n_thresholds: int = INFNET_THRESHOLDS) -> float:
    """Dice averaged over thresholds, as in the Inf-Net evaluation (Fan et al., IEEE TMI 2020).

    The map is min-max rescaled to [0, 1] (a constant map is left as it is), then thresholded at
    t_k = k / (n_thresholds - 1), k = 0..n_thresholds-1, predicting p > t_k; the Dice of each threshold is
    averaged. Thresholds where both prediction and ground truth are empty are left out (nan if all are).

    Shape: prob and target (H, W) (numpy or torch), target in {0, 1}. Returns a float.
    """
    p = np.asarray(prob, dtype=np.float64).ravel()
    g = np.asarray(target).ravel() > 0
    if p.shape != g.shape or p.size == 0:
        raise ValueError(f"prob and target must be non-empty and of one shape, got {np.shape(prob)} and {np.shape(target)}")
    lo, hi = p.min(), p.max()
    if hi > lo:
        p = (p - lo) / (hi - lo)
    v = p * (n_thresholds - 1)  # p > k / (n - 1)  <=>  v > k
    ks = np.arange(n_thresholds)
    pos, neg = np.sort(v[g]), np.sort(v[~g])
    tp = len(pos) - np.searchsorted(pos, ks, side="right")
    fp = len(neg) - np.searchsorted(neg, ks, side="right")
    fn = len(pos) - tp
    den = 2 * tp + fp + fn
    dice = np.divide(2.0 * tp, den, out=np.full(n_thresholds, np.nan), where=den > 0)
    return float(np.nanmean(dice)) if (den > 0).any() else float("nan")
