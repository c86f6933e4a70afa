import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from utils.losses import (
    AUX_WEIGHT,
    DICE_SMOOTH,
    LOSSES,
    bce_dice_loss,
    bce_loss,
    ce_dice_loss,
    ce_dice_union_loss,
    ce_loss,
    dice_loss,
    get_loss,
    loss_mode,
    output_channels,
    union_bce_dice_loss,
)

BIG = 20.0  # logit magnitude at which sigmoid/softmax are 1 - 2e-9 confident


def binary_logits(target: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """(N, 1, H, W) logits of +-BIG agreeing with target (sign=1) or opposing it (sign=-1)."""
    return (sign * BIG * (2 * target.float() - 1)).unsqueeze(1)


def onehot_logits(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    return BIG * F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()


@pytest.fixture
def target() -> torch.Tensor:
    return torch.tensor([[[0, 1], [1, 1]], [[0, 0], [1, 0]]])  # (2, 2, 2), 4 foreground pixels of 8


def test_bce_hand_values(target):
    assert bce_loss(torch.zeros(2, 1, 2, 2), target).item() == pytest.approx(math.log(2))
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]]]])
    t = torch.tensor([[[1, 0], [0, 1]]])
    # Per pixel: softplus(-x) for target 1, softplus(x) for target 0.
    expected = sum(math.log1p(math.exp(v)) for v in (-2.0, -1.0, 0.5, -3.0)) / 4
    assert bce_loss(logits, t).item() == pytest.approx(expected)
    torch.testing.assert_close(bce_loss(logits, t), F.binary_cross_entropy_with_logits(logits[:, 0], t.float()))


def test_perfect_prediction_near_zero(target):
    assert bce_loss(binary_logits(target), target).item() < 1e-6
    assert dice_loss(binary_logits(target), target).item() < 1e-6
    assert ce_loss(onehot_logits(target, 2), target).item() < 1e-6
    assert dice_loss(onehot_logits(target, 2), target).item() < 1e-6
    three = torch.tensor([[[0, 1], [2, 2]]])
    assert ce_dice_loss(onehot_logits(three, 3), three).item() < 1e-6


def test_disjoint_dice_near_one(target):
    loss = dice_loss(binary_logits(target, sign=-1.0), target).item()
    # Only the smoothing term survives: 1 - 1 / (4 + 4 + 1).
    assert loss == pytest.approx(1 - DICE_SMOOTH / (4 + 4 + DICE_SMOOTH), abs=1e-6)
    assert loss > 0.85


def test_dice_empty_ground_truth_rule():
    empty = torch.zeros(2, 3, 4, dtype=torch.long)
    npix = empty.numel()
    assert dice_loss(binary_logits(empty), empty).item() == pytest.approx(0.0, abs=1e-6)
    full = torch.full((2, 1, 3, 4), BIG)
    assert dice_loss(full, empty).item() == pytest.approx(1 - DICE_SMOOTH / (npix + DICE_SMOOTH), abs=1e-6)


def test_per_image_dice_weighs_each_image_equally():
    # image 0: a 1-pixel lesion, missed; image 1: a 3-pixel lesion, found. Pooled, the found lesion dominates.
    t = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 0]]])
    pred = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 0]]])
    logits = binary_logits(pred)
    s = DICE_SMOOTH
    pooled = 1 - (2 * 3 + s) / (3 + 4 + s)
    per_image = ((1 - s / (0 + 1 + s)) + (1 - (2 * 3 + s) / (3 + 3 + s))) / 2
    assert dice_loss(logits, t).item() == pytest.approx(pooled, abs=1e-6)
    assert dice_loss(logits, t, batch=False).item() == pytest.approx(per_image, abs=1e-6)
    assert per_image > pooled  # the missed small lesion costs more per image
    for name in ("dice", "bce_dice"):
        assert get_loss(name, "binary", 2, batch_dice=False)(logits, t).item() == pytest.approx(
            LOSSES[name](logits, t, batch=False).item(), abs=1e-6)
    assert get_loss("bce", "binary", 2, batch_dice=False)(logits, t).item() == pytest.approx(bce_loss(logits, t).item())
    three = torch.tensor([[[0, 1], [2, 2]], [[1, 1], [0, 0]]])
    per_image_ce = (ce_dice_loss(onehot_logits(three[:1], 3), three[:1]) + ce_dice_loss(
        onehot_logits(torch.zeros_like(three[1:]), 3), three[1:])) / 2
    both = torch.cat([onehot_logits(three[:1], 3), onehot_logits(torch.zeros_like(three[1:]), 3)])
    torch.testing.assert_close(ce_dice_loss(both, three, batch=False), per_image_ce)


def test_dice_one_channel_equals_two_channel():
    torch.manual_seed(0)
    z = torch.randn(3, 1, 5, 5)
    t = torch.randint(0, 2, (3, 5, 5))
    # softmax over [0, z] gives sigmoid(z) for class 1.
    two = torch.cat([torch.zeros_like(z), z], dim=1)
    torch.testing.assert_close(dice_loss(z, t), dice_loss(two, t))


def test_dice_averages_foreground_classes():
    t = torch.tensor([[[1, 1], [0, 0]]])
    logits = onehot_logits(torch.tensor([[[1, 1], [0, 0]]]), 3)  # class 1 perfect, class 2 absent and unpredicted
    assert dice_loss(logits, t).item() == pytest.approx(0.0, abs=1e-6)
    logits = onehot_logits(torch.tensor([[[2, 2], [0, 0]]]), 3)  # class 1 missed, class 2 predicted on 2 px
    expected = ((1 - 1 / (2 + 1)) + (1 - 1 / (2 + 1))) / 2
    assert dice_loss(logits, t).item() == pytest.approx(expected, abs=1e-6)


def test_wrong_channel_count_raises(target):
    with pytest.raises(ValueError, match="ce"):
        bce_loss(torch.zeros(2, 2, 2, 2), target)
    with pytest.raises(ValueError, match="bce"):
        ce_loss(torch.zeros(2, 1, 2, 2), target)
    with pytest.raises(ValueError, match="'ce'"):
        get_loss("bce_dice", "multiclass", 3)
    with pytest.raises(ValueError, match="'bce'"):
        get_loss("ce", "binary", 2)
    with pytest.raises(ValueError, match="3 channels"):
        get_loss("dice", "multiclass", 3)(torch.zeros(2, 2, 2, 2), target)
    with pytest.raises(ValueError, match="'ce', 'ce_dice', 'ce_dice_union'"):
        loss_mode("bce", 3)


@pytest.mark.parametrize("name,classes,mode,channels", [
    ("bce", 2, "binary", 1), ("bce_dice", 2, "binary", 1), ("dice", 2, "binary", 1), ("dice", 3, "multiclass", 3),
    ("ce", 2, "multiclass", 2), ("ce_dice", 3, "multiclass", 3)])
def test_the_mode_decides_the_output_channels(name, classes, mode, channels):
    assert loss_mode(name, classes) == mode and output_channels(mode, classes) == channels
    logits, target = torch.zeros(2, channels, 2, 2), torch.zeros(2, 2, 2, dtype=torch.long)
    assert torch.isfinite(get_loss(name, mode, classes)(logits, target))


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="focal"):
        get_loss("focal", "binary", 2)


@pytest.mark.parametrize("name", list(LOSSES))
def test_shape_mismatch_raises(name):
    logits = torch.zeros(2, 1 if name in ("bce", "bce_dice", "dice") else 2, 4, 4)
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\)"):  # (N, 1, H, W) target is not broadcast
        LOSSES[name](logits, torch.zeros(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(2, 4, 3\)"):
        LOSSES[name](logits, torch.zeros(2, 4, 3, dtype=torch.long))


def test_float_target_raises():
    with pytest.raises(TypeError, match="float32"):
        bce_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2))


def test_list_outputs_use_aux_weight(target):
    torch.manual_seed(0)
    main, aux1, aux2 = (torch.randn(2, 1, 2, 2) for _ in range(3))
    loss = get_loss("bce_dice", "binary", 2)
    expected = bce_dice_loss(main, target) + AUX_WEIGHT * (bce_dice_loss(aux1, target) + bce_dice_loss(aux2, target))
    torch.testing.assert_close(loss([main, aux1, aux2], target), expected)
    torch.testing.assert_close(loss([main], target), loss(main, target))


def test_bf16_logits_computed_in_float32(target):
    logits = torch.randn(2, 2, 2, 2)
    out = get_loss("ce_dice", "multiclass", 2)(logits.bfloat16(), target)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ce_dice_loss(logits.bfloat16().float(), target))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_finite(name, target):
    channels = 1 if name in ("bce", "bce_dice", "dice") else 2
    logits = torch.randn(2, channels, 2, 2, requires_grad=True)
    get_loss(name, "binary" if channels == 1 else "multiclass", 2)(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(list(LOSSES)),
    classes=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.01, 100.0),
)
def test_losses_finite_and_non_negative(name, classes, seed, scale):
    num_classes = {"bce": 1, "bce_dice": 1}.get(name, classes if name == "dice" else max(classes, 2))
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(2, num_classes, 4, 4, generator=gen)
    target = torch.randint(0, max(num_classes, 2), (2, 4, 4), generator=gen)
    mode = "binary" if num_classes == 1 else "multiclass"
    value = get_loss(name, mode, max(num_classes, 2))(logits, target)
    assert torch.isfinite(value) and value.item() >= 0
    if name == "dice":
        assert value.item() <= 1


def union_logit(logits: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) sigmoid logit of the union of the foreground classes: log p(any) - log p(background)."""
    return (logits[:, 1:].logsumexp(1) - logits[:, 0]).unsqueeze(1)


@pytest.mark.parametrize("batch", [True, False])
def test_union_term_is_bce_dice_of_the_union(batch):
    torch.manual_seed(0)
    logits = 3 * torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    target[1] = 0  # an image with no lesion: the per-image Dice's empty rule applies to the union too
    expected = bce_dice_loss(union_logit(logits), (target > 0).long(), batch=batch)
    torch.testing.assert_close(union_bce_dice_loss(logits, target, batch=batch), expected)
    torch.testing.assert_close(ce_dice_union_loss(logits, target, batch=batch),
                               ce_dice_loss(logits, target, batch=batch) + expected)


def test_union_term_ignores_the_type():
    three = torch.tensor([[[0, 1], [2, 2]]])
    swapped = torch.tensor([[[0, 2], [1, 1]]])  # every ground-glass pixel called consolidation and back
    assert union_bce_dice_loss(onehot_logits(swapped, 3), three).item() < 1e-6
    assert ce_dice_loss(onehot_logits(swapped, 3), three).item() > 1
    missed = torch.zeros_like(three)  # the lesion lost to the background
    assert union_bce_dice_loss(onehot_logits(missed, 3), three).item() > 1


def test_union_of_some_classes():
    torch.manual_seed(3)
    logits = 2 * torch.randn(2, 4, 3, 3)  # 0 background, 1 lung, 2 and 3 the lesion types
    target = torch.randint(0, 4, (2, 3, 3))
    union = logits[:, 2:].logsumexp(1) - logits[:, :2].logsumexp(1)  # lesion against background and lung
    expected = bce_dice_loss(union.unsqueeze(1), (target >= 2).long(), batch=False)
    loss = get_loss("ce_dice_union", "multiclass", 4, batch_dice=False, union=(2, 3))
    torch.testing.assert_close(loss(logits, target), ce_dice_loss(logits, target, batch=False) + expected)
    for bad in [(), (0, 1, 2, 3), (4,)]:
        with pytest.raises(ValueError, match="some but not all"):
            union_bce_dice_loss(logits, target, union=bad)
    with pytest.raises(ValueError, match="'ce_dice_union' only"):
        get_loss("ce_dice", "multiclass", 4, union=(2, 3))


def test_union_loss_takes_class_weights():
    torch.manual_seed(2)
    logits, target, w = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4)), [1.0, 2.0, 5.0]
    torch.testing.assert_close(get_loss("ce_dice_union", "multiclass", 3, class_weights=w)(logits, target),
                               ce_dice_loss(logits, target, weight=torch.tensor(w))
                               + union_bce_dice_loss(logits, target))
    with pytest.raises(ValueError, match="softmax"):
        union_bce_dice_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
