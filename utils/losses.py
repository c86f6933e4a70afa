"""Segmentation losses: pure functions on logits.

Shapes everywhere: logits (N, C, H, W) (any float dtype; computed in float32), target (N, H, W) integer
class indices. C = 1 is a binary (sigmoid) head with target in {0, 1}; C >= 2 is softmax with class 0 =
background. Target values are not range-checked here (that would be a GPU sync per step).

The softmax losses take an ``ignore_index`` (None: every pixel counts): pixels whose target is it count in
neither the cross-entropy nor the Dice terms (e.g. a lesion label that is no class of the task). The
caller passes the value (data.labels.IGNORE_INDEX; utils does not import data).
"""

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor
from torch.nn import functional as F

# Laplace smoothing of the soft Dice ratio; keeps it defined when prediction and ground truth are empty.
DICE_SMOOTH = 1.0
# Weight of each auxiliary / deep-supervision output relative to the main one (torchvision's reference value).
AUX_WEIGHT = 0.4


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits are {tuple(logits.shape)} and target is {tuple(target.shape)}; "
            "expected logits (N, C, H, W) and target (N, H, W) of class indices"
        )
    if target.dtype.is_floating_point or target.dtype.is_complex:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy on a single-channel head, mean over pixels.

    Shape: logits (N, 1, H, W), target (N, H, W) in {0, 1}. Returns a scalar.
    """
    _check(logits, target)
    if logits.shape[1] != 1:
        raise ValueError(
            f"bce needs 1 output channel, logits have {logits.shape[1]}; use one of {_MULTICLASS} for C channels"
        )
    return F.binary_cross_entropy_with_logits(logits[:, 0].float(), target.float())


def ce_loss(logits: Tensor, target: Tensor, ignore_index: int | None = None, weight: Tensor | None = None) -> Tensor:
    """Multi-class cross-entropy, mean over pixels (over the pixels not ignored, with ``ignore_index``).

    ``weight``: one weight per class (C,), e.g. to weigh a rare class up; the mean is then weighted, as
    torch's ``F.cross_entropy`` does. A batch whose every pixel is ignored gives 0, not nan.

    Shape: logits (N, C, H, W) with C >= 2, target (N, H, W) in [0, C) (or ``ignore_index``). Returns a scalar.
    """
    _check(logits, target)
    if logits.shape[1] < 2:
        raise ValueError(
            f"ce needs >= 2 output channels, logits have {logits.shape[1]}; use bce or bce_dice for 1 channel"
        )
    if weight is not None:
        weight = weight.to(logits.device, torch.float32)
    if ignore_index is None:
        return F.cross_entropy(logits.float(), target.long(), weight=weight)
    # the sum over the kept pixels divided by their (weighted) count, clamped: torch's mean is nan (0 / 0)
    # when every pixel is ignored, and the count stays on the device (no sync)
    target = target.long()
    total = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index, reduction="sum")
    kept = target != ignore_index
    if weight is None:
        count = kept.sum()
    else:
        count = (weight[target.clamp(0, logits.shape[1] - 1)] * kept).sum()
    return total / count.clamp_min(torch.finfo(torch.float32).tiny)


def dice_loss(logits: Tensor, target: Tensor, smooth: float = DICE_SMOOTH, batch: bool = True,
              ignore_index: int | None = None) -> Tensor:
    """Soft Dice loss over foreground classes, pooled over the whole batch or per image.

    Per foreground class k, with p the predicted probability and g the one-hot ground truth summed over
    (N, H, W): `1 - (2 * sum(p * g) + smooth) / (sum(p) + sum(g) + smooth)`; the loss is the mean over
    k. C = 1: p = sigmoid(logits), foreground = target 1. C >= 2: p = softmax(logits), foreground classes
    1..C-1 (background is not scored).

    `batch=False` sums over (H, W) only and averages the per-image ratios (MONAI's `DiceLoss(batch=False)`,
    nnU-Net's `batch_dice=False`): every image weighs the same, so a slice with a small lesion counts as much
    as one with a large lesion, as in the mean per-image Dice that evaluate.py reports.

    Empty-mask rule: if a class is absent from the batch's ground truth (the image's, with batch=False), its
    term is `1 - smooth / (sum(p) + smooth)`: 0 only when nothing is predicted, and its gradient is weak, so Dice
    alone barely punishes false positives on lesion-free slices. Pair it with BCE/CE (`bce_dice`, `ce_dice`).

    ``ignore_index`` (softmax only): pixels whose target is it add to neither p nor g.

    Shape: logits (N, C, H, W), target (N, H, W). Returns a scalar in [0, 1].
    """
    _check(logits, target)
    logits = logits.float()
    if ignore_index is not None and logits.shape[1] == 1:
        raise ValueError("ignore_index applies to softmax (C >= 2) Dice only")
    num_classes = logits.shape[1]
    if num_classes == 1:
        probs = torch.sigmoid(logits)
        truth = target.unsqueeze(1).float()
    else:
        probs = logits.softmax(dim=1)[:, 1:]
        # Comparing with arange instead of F.one_hot avoids one_hot's range check (a GPU sync).
        classes = torch.arange(1, num_classes, device=target.device).view(1, -1, 1, 1)
        truth = (target.unsqueeze(1) == classes).float()
        if ignore_index is not None:  # truth is already 0 there (ignore_index is no foreground class)
            probs = probs * (target != ignore_index).unsqueeze(1)
    dims = (0, 2, 3) if batch else (2, 3)
    intersection = (probs * truth).sum(dims)
    total = probs.sum(dims) + truth.sum(dims)
    dice = (2 * intersection + smooth) / (total + smooth)
    return 1 - dice.mean()


def bce_dice_loss(logits: Tensor, target: Tensor, batch: bool = True) -> Tensor:
    """`bce_loss + dice_loss` (1:1). Shape: logits (N, 1, H, W), target (N, H, W). Returns a scalar."""
    return bce_loss(logits, target) + dice_loss(logits, target, batch=batch)


def ce_dice_loss(logits: Tensor, target: Tensor, batch: bool = True, ignore_index: int | None = None,
                 weight: Tensor | None = None) -> Tensor:
    """`ce_loss + dice_loss` (1:1); ``weight`` weighs the CE term's classes (the Dice term, a mean over
    classes, weighs them alike already). Shape: logits (N, C, H, W) with C >= 2, target (N, H, W). Returns
    a scalar."""
    return (ce_loss(logits, target, ignore_index, weight)
            + dice_loss(logits, target, batch=batch, ignore_index=ignore_index))


def union_bce_dice_loss(logits: Tensor, target: Tensor, batch: bool = True, ignore_index: int | None = None,
                        union: Sequence[int] | None = None) -> Tensor:
    """`bce_dice` of the union of some classes of a softmax head (e.g. the lesion types: any lesion) against
    the rest.

    The union's probability is the sum of its classes' (its log is computed from the logits, stable); its
    target is every pixel of those classes. This is the binary recipe's loss applied to the union, whatever
    the class inside it: nnU-Net's region-based training, which trains nested regions as well as the
    classes. ``union``: its class indices (default: every foreground class, 1..C-1). ``ignore_index``: those
    pixels count in neither term. ``batch``: as in `dice_loss`.

    Shape: logits (N, C, H, W) with C >= 2, target (N, H, W). Returns a scalar.
    """
    _check(logits, target)
    num_classes = logits.shape[1]
    union = tuple(range(1, num_classes)) if union is None else tuple(union)
    if num_classes < 2 or not union or not all(0 <= k < num_classes for k in union) or len(union) == num_classes:
        raise ValueError(f"the union {union} must be some but not all of a softmax head's classes; logits have "
                         f"{num_classes} channels")
    logits = logits.float()
    rest = [k for k in range(num_classes) if k not in union]
    log_total = logits.logsumexp(dim=1)
    log_union = logits[:, list(union)].logsumexp(dim=1) - log_total
    log_rest = logits[:, rest].logsumexp(dim=1) - log_total
    kept = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    classes = torch.tensor(union, device=target.device).view(1, -1, 1, 1)
    truth = ((target.unsqueeze(1) == classes).any(dim=1) & kept).float()
    bce = (-(truth * log_union + (1 - truth) * log_rest) * kept).sum() / kept.sum().clamp_min(1)
    probs = log_union.exp() * kept
    dims = (0, 1, 2) if batch else (1, 2)
    dice = (2 * (probs * truth).sum(dims) + DICE_SMOOTH) / (probs.sum(dims) + truth.sum(dims) + DICE_SMOOTH)
    return bce + 1 - dice.mean()


def ce_dice_union_loss(logits: Tensor, target: Tensor, batch: bool = True, ignore_index: int | None = None,
                       weight: Tensor | None = None, union: Sequence[int] | None = None) -> Tensor:
    """`ce_dice_loss + union_bce_dice_loss` (1:1): the classes, and the union of ``union``'s classes (default:
    every foreground class) as the binary recipe trains it, so that a lesion of either type is not lost to
    the background while the types are being told apart. ``weight`` weighs the CE term's classes.
    Shape: logits (N, C, H, W) with C >= 2, target (N, H, W). Returns a scalar."""
    return (ce_dice_loss(logits, target, batch, ignore_index, weight)
            + union_bce_dice_loss(logits, target, batch, ignore_index, union))


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "bce": bce_loss,
    "dice": dice_loss,
    "bce_dice": bce_dice_loss,
    "ce": ce_loss,
    "ce_dice": ce_dice_loss,
    "ce_dice_union": ce_dice_union_loss,
}
MODES = ("binary", "multiclass")
_BINARY = ("bce", "bce_dice")  # sigmoid losses
_MULTICLASS = ("ce", "ce_dice", "ce_dice_union")  # softmax losses; dice takes either mode
_WITH_DICE = ("dice", "bce_dice", "ce_dice", "ce_dice_union")
WEIGHTED = _MULTICLASS  # the losses with a cross-entropy term that class weights weigh


def loss_mode(name: str, num_classes: int) -> str:
    """The mode a loss runs in for ``num_classes`` classes (background included): the one rule.

    bce/bce_dice are "binary" (two classes only), ce/ce_dice "multiclass", dice "binary" for two classes
    and "multiclass" for more. Raises ValueError for a binary loss on more than two classes.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {tuple(LOSSES)}")
    if name in _BINARY:
        if num_classes > 2:
            raise ValueError(f"loss {name!r} is binary; {num_classes} classes need one of {_MULTICLASS}")
        return "binary"
    if name in _MULTICLASS:
        return "multiclass"
    return "binary" if num_classes == 2 else "multiclass"


def output_channels(mode: str, num_classes: int) -> int:
    """The model's output channels a loss of ``mode`` reads: 1 sigmoid channel (binary), or one softmax
    channel per class, background included (multiclass)."""
    if mode not in MODES:
        raise ValueError(f"unknown loss mode {mode!r}; choose one of {MODES}")
    return 1 if mode == "binary" else num_classes


def get_loss(
    name: str, mode: str, num_classes: int, batch_dice: bool = True, ignore_index: int | None = None,
    class_weights: Sequence[float] | None = None, union: Sequence[int] | None = None,
) -> Callable[[Tensor | Sequence[Tensor], Tensor], Tensor]:
    """Return `loss(outputs, target)` for the named loss in the stated mode (segmentation_models.pytorch style).

    Args:
        name: one of `LOSSES`.
        mode: "binary" (logits (N, 1, H, W), target in {0, 1}) or "multiclass" (logits (N, num_classes, H, W),
            target in [0, num_classes)); :func:`loss_mode` gives the mode a loss takes by default.
        num_classes: classes of the target, background included (2 for lesion vs background).
        batch_dice: the Dice term pooled over the batch (True) or averaged over images (False); see `dice_loss`.
        ignore_index: multiclass only: the target value whose pixels no term counts (None: none is ignored).
        class_weights: `WEIGHTED` losses only: one cross-entropy weight per class, background included.
        union: ce_dice_union only: the class indices of the union it trains (default: every foreground class).

    Returns:
        A callable taking `outputs` = logits (N, C, H, W), C = `output_channels(mode, num_classes)`, or a
        list `[main, aux, ...]` of them (auxiliary or deep-supervision heads) and target (N, H, W); it returns
        `loss(main) + AUX_WEIGHT * sum(loss(aux_i))`.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {tuple(LOSSES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    if mode == "binary" and num_classes != 2:
        raise ValueError(f"mode 'binary' is for 2 classes, got num_classes={num_classes}; use mode 'multiclass'")
    if name in _BINARY and mode != "binary":
        raise ValueError(f"loss {name!r} is binary (1 sigmoid channel), asked for mode {mode!r}; "
                         f"use one of {_MULTICLASS}")
    if name in _MULTICLASS and mode != "multiclass":
        raise ValueError(f"loss {name!r} is multiclass, asked for mode {mode!r}; use 'bce' or 'bce_dice'")
    if ignore_index is not None and mode != "multiclass":
        raise ValueError(f"ignore_index is for mode 'multiclass', asked with mode {mode!r}")
    if class_weights is not None and (name not in _MULTICLASS or len(class_weights) != num_classes):
        raise ValueError(f"class weights {list(class_weights)} need one of the losses {WEIGHTED} and one weight "
                         f"per class ({num_classes}); got loss {name!r}")
    if union is not None and name != "ce_dice_union":
        raise ValueError(f"a union of classes is trained by loss 'ce_dice_union' only, not {name!r}")
    num_channels = output_channels(mode, num_classes)
    fn = LOSSES[name]
    if union is not None:
        fn = partial(fn, union=tuple(union))
    if name in _WITH_DICE and not batch_dice:
        fn = partial(fn, batch=False)
    if ignore_index is not None:
        fn = partial(fn, ignore_index=ignore_index)
    if class_weights is not None:
        fn = partial(fn, weight=torch.tensor(list(class_weights), dtype=torch.float32))

    def single(logits: Tensor, target: Tensor) -> Tensor:
        if logits.ndim != 4 or logits.shape[1] != num_channels:
            raise ValueError(f"loss {name!r} was set up for {num_channels} channels, logits are {tuple(logits.shape)}")
        return fn(logits, target)

    def loss(outputs: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return single(outputs, target)
        if not isinstance(outputs, (list, tuple)) or not outputs:
            raise TypeError(
                f"outputs must be a tensor or a non-empty list [main, aux, ...], got {type(outputs).__name__}"
            )
        total = single(outputs[0], target)
        for aux in outputs[1:]:
            total = total + AUX_WEIGHT * single(aux, target)
        return total

    return loss
