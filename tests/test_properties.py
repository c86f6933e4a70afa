"""Property-based tests (hypothesis) of metrics, losses, slice transforms and the image readers.

They complete tests/test_metrics.py and tests/test_losses.py, which already check metric bounds, Dice
symmetry and IoU <= Dice on random 3x3 masks, and loss finiteness for logits up to 100x a normal draw.
Example counts are fixed (max_examples) so docs/RELIABILITY.md can quote them; READER_EXAMPLES files
per reader test.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from data.transforms import (IMAGE_SUFFIXES, InputError, normalize, prepare_slices, read_image, read_mask,
                             resize_images, resize_masks)
from utils.losses import LOSSES, get_loss
from utils.metrics import SegmentationMeter, confusion_counts, metrics_from_counts

FAST = settings(max_examples=60, deadline=None)
READER_EXAMPLES = 300
READERS = settings(max_examples=READER_EXAMPLES, deadline=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def close_or_both_nan(a: float, b: float, tol: float = 1e-12) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


# ----------------------------------------------------------------------------- metrics
counts = st.integers(0, 10**12)


@FAST
@given(tp=counts, fp=counts, fn=counts, tn=counts)
def test_metrics_from_any_counts_are_bounded_and_consistent(tp, fp, fn, tn):
    m = metrics_from_counts(tp, fp, fn, tn)
    denominators = {"dice": 2 * tp + fp + fn, "iou": tp + fp + fn, "precision": tp + fp, "recall": tp + fn,
                    "specificity": tn + fp, "accuracy": tp + fp + fn + tn}
    for key, den in denominators.items():
        assert math.isnan(m[key]) == (den == 0), key  # nan exactly when undefined, never a silent 0 or 1
        assert math.isnan(m[key]) or 0.0 <= m[key] <= 1.0, key
    assert close_or_both_nan(m["f1"], m["dice"])
    if not math.isnan(m["dice"]):
        assert m["iou"] <= m["dice"]
        assert m["dice"] == pytest.approx(2 * m["iou"] / (1 + m["iou"]), rel=1e-12)
        # Dice is the harmonic mean of precision and recall where both are defined
        p, r = m["precision"], m["recall"]
        if not (math.isnan(p) or math.isnan(r)) and p + r > 0:
            assert m["dice"] == pytest.approx(2 * p * r / (p + r), rel=1e-9)


label_maps = hnp.arrays(np.int64, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=6),
                        elements=st.integers(0, 2))


@FAST
@given(label_maps)
def test_perfect_prediction_scores_one_and_disjoint_scores_zero(labels):
    target = torch.from_numpy(labels == 2)
    perfect = SegmentationMeter()
    perfect.update(target.float(), target)
    p = perfect.pooled()
    assert p["fp"] == p["fn"] == 0 and p["accuracy"] == 1.0
    assert (p["dice"] == p["iou"] == 1.0) if target.any() else (math.isnan(p["dice"]) and math.isnan(p["iou"]))

    disjoint_pred = torch.from_numpy(labels == 1)  # never overlaps label 2
    disjoint = SegmentationMeter()
    disjoint.update(disjoint_pred.float(), target)
    d = disjoint.pooled()
    assert d["tp"] == 0
    assert d["dice"] == d["iou"] == 0.0 if (target.any() or disjoint_pred.any()) else math.isnan(d["dice"])
    for row in disjoint.per_image():
        assert row["empty_gt"] or row["dice"] == 0.0


@FAST
@given(label_maps)
def test_confusion_counts_partition_every_pixel_and_mirror_under_swaps(labels):
    pred, target = torch.from_numpy(labels >= 1), torch.from_numpy(labels % 2 == 0)
    c = confusion_counts(pred, target)
    assert (c.sum(1) == labels.shape[1] * labels.shape[2]).all() and (c >= 0).all()
    tp, fp, fn, tn = c.unbind(1)
    assert torch.equal(confusion_counts(target, pred), torch.stack([tp, fn, fp, tn], 1))  # swap: fp <-> fn
    assert torch.equal(confusion_counts(~pred, ~target), torch.stack([tn, fn, fp, tp], 1))  # complement both


@FAST
@given(label_maps, st.data())
def test_pooled_counts_do_not_depend_on_batching_or_order(labels, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    probs = torch.rand(labels.shape, generator=gen)
    target = torch.from_numpy(labels == 2)
    whole = SegmentationMeter()
    whole.update(probs, target)
    n = labels.shape[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
    order = torch.tensor(data.draw(st.permutations(range(n))))
    pieces = SegmentationMeter()
    for lo, hi in zip([0, *cuts], [*cuts, n]):
        if hi > lo:
            pieces.update(probs[order][lo:hi], target[order][lo:hi])
    a, b = whole.summary(), pieces.summary()
    assert all(close_or_both_nan(a["pooled"][k], b["pooled"][k]) for k in a["pooled"])
    assert close_or_both_nan(a["auc"], b["auc"])


@FAST
@given(label_maps, st.floats(0, 1), st.floats(0, 1), st.integers(0, 2**16))
def test_raising_the_threshold_never_predicts_more(labels, t1, t2, seed):
    low, high = sorted((t1, t2))
    probs = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed))
    target = torch.from_numpy(labels == 2)
    scored = []
    for threshold in (low, high):
        meter = SegmentationMeter()
        meter.update(probs, target, threshold)
        scored.append(meter.pooled())
    assert scored[1]["tp"] + scored[1]["fp"] <= scored[0]["tp"] + scored[0]["fp"]
    assert scored[1]["tp"] <= scored[0]["tp"]


# ----------------------------------------------------------------------------- losses
def channels_for(name: str, classes: int) -> int:
    return {"bce": 1, "bce_dice": 1}.get(name, classes if name == "dice" else max(classes, 2))


def loss_for(name: str, channels: int):
    """The loss on ``channels`` output channels: one is binary (sigmoid), more are multiclass (softmax)."""
    return get_loss(name, "binary" if channels == 1 else "multiclass", max(channels, 2))


extreme = st.sampled_from([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])


@settings(max_examples=80, deadline=None)
@given(name=st.sampled_from(sorted(LOSSES)), classes=st.integers(1, 4), data=st.data(),
       target_kind=st.sampled_from(["random", "all-background", "all-foreground"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_losses_stay_finite_and_non_negative_at_extreme_logits(name, classes, data, target_kind, dtype):
    c = channels_for(name, classes)
    shape = (2, c, 3, 4)
    values = data.draw(st.lists(extreme, min_size=math.prod(shape), max_size=math.prod(shape)))
    logits = torch.tensor(values).view(shape).to(dtype).requires_grad_()
    top = max(c, 2)
    if target_kind == "random":
        target = torch.tensor(data.draw(st.lists(st.integers(0, top - 1), min_size=24, max_size=24))).view(2, 3, 4)
    else:
        target = torch.full((2, 3, 4), 0 if target_kind == "all-background" else top - 1)
    loss = loss_for(name, c)(logits, target)
    assert torch.isfinite(loss) and loss.item() >= 0
    if name == "dice":
        assert loss.item() <= 1
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@FAST
@given(name=st.sampled_from(sorted(LOSSES)), classes=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_losses_do_not_depend_on_the_order_of_the_batch(name, classes, seed):
    c = channels_for(name, classes)
    gen = torch.Generator().manual_seed(seed)
    logits = 5 * torch.randn(4, c, 5, 5, generator=gen)
    target = torch.randint(0, max(c, 2), (4, 5, 5), generator=gen)
    order = torch.randperm(4, generator=gen)
    loss = loss_for(name, c)
    torch.testing.assert_close(loss(logits[order], target[order]), loss(logits, target))


# ----------------------------------------------------------------------------- normalisation and resizing
slices = hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=12),
                    elements=st.floats(-1e6, 1e6, width=32))  # HU and 8/16-bit ranges with room to spare


@FAST
@given(slices)
def test_minmax_maps_each_slice_onto_zero_to_one(x):
    y = normalize(x, "minmax")
    assert y.dtype == np.float32 and y.shape == x.shape
    assert ((y >= 0) & (y <= 1)).all()
    for xs, ys in zip(x, y):
        if xs.max() > xs.min():
            assert ys[xs == xs.min()].max() == 0.0 and ys[xs == xs.max()].min() == 1.0
        else:
            assert (ys == 0).all()  # a constant slice is all zeros
    assert np.array_equal(np.concatenate([normalize(xs[None], "minmax") for xs in x]), y)  # slice by slice


@FAST
@given(slices, st.floats(-2000, 2000), st.floats(1e-3, 4000))
def test_window_is_clipped_and_monotone(x, low, width):
    high = low + width
    assume(high > low)
    y = normalize(x, "window", (low, high))
    assert ((y >= 0) & (y <= 1)).all()
    flat_x, flat_y = x.ravel(), y.ravel()
    order = np.argsort(flat_x, kind="stable")
    assert (np.diff(flat_y[order]) >= 0).all()  # a brighter voxel never maps darker
    assert (flat_y[flat_x <= low] == 0).all() and (flat_y[flat_x >= high] == 1).all()


masks = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=9),
                   elements=st.integers(0, 3))


@FAST
@given(masks, st.integers(1, 5), st.integers(1, 5))
def test_mask_upsampled_by_an_integer_factor_comes_back_exactly(m, fy, fx):
    h, w = m.shape[1:]
    up = resize_masks(m, (h * fy, w * fx))
    assert up.dtype == torch.uint8 and set(up.unique().tolist()) <= set(np.unique(m).tolist())
    assert np.array_equal(resize_masks(up, (h, w)).numpy(), m)


@FAST
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=12),
                  elements=st.floats(-1e4, 1e4, width=32)),
       st.integers(1, 20), st.integers(1, 20))
def test_resized_images_stay_within_the_input_range(x, h, w):
    y = resize_images(x, (h, w)).numpy()
    assert y.shape == (x.shape[0], h, w) and np.isfinite(y).all()
    tol = 1e-5 * max(1.0, float(np.abs(x).max()))  # float32 rounding of the interpolation weights
    for xs, ys in zip(x, y):  # bilinear and antialiased weights are convex: no overshoot
        assert xs.min() - tol <= ys.min() and ys.max() <= xs.max() + tol


@FAST
@given(slices, st.sampled_from([16, 32]))
def test_prepared_slices_are_in_zero_to_one(x, size):
    y = prepare_slices(x, {"size": size, "norm": "minmax", "window": None})
    assert y.shape == (x.shape[0], size, size) and bool(((y >= 0) & (y <= 1)).all())


def test_float_image_with_nan_pixels_is_refused(tmp_path):
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    a[0, 0] = np.nan
    Image.fromarray(a).save(tmp_path / "nan.tif")
    with pytest.raises(InputError, match="nan.tif"):
        read_image(tmp_path / "nan.tif")


def test_minmax_survives_the_whole_float32_range():
    x = np.array([[[-3e38, 0.0], [1.0, 3e38]]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow on the way
        y = normalize(x, "minmax")
    assert np.isfinite(y).all() and y.min() == 0 and y.max() == 1
    assert y[0, 0, 1] == pytest.approx(0.5) and y[0, 1, 0] == pytest.approx(0.5)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, (2, 5, 7), elements=st.floats(-1e6, 1e6, width=32)))
def test_minmax_equals_the_plain_formula_bit_for_bit(x):
    lo = x.min(axis=(-2, -1), keepdims=True)
    span = x.max(axis=(-2, -1), keepdims=True) - lo
    plain = np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)
    np.testing.assert_array_equal(normalize(x, "minmax"), plain)


# ----------------------------------------------------------------------------- image readers
def _encode(fmt: str, mode: str) -> bytes:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (13, 17)).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode == "F":
        img = Image.fromarray(gray.astype(np.float32) / 255)
    else:
        img = Image.fromarray(gray).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# valid files of every format and a spread of modes the readers handle, to cut short and corrupt
VALID = {f"{fmt} {mode}": (ext, _encode(fmt, mode)) for fmt, ext, modes in [
    ("PNG", ".png", ["L", "RGB", "RGBA", "P", "I;16", "1", "LA"]),
    ("JPEG", ".jpg", ["L", "RGB", "CMYK"]),
    ("BMP", ".bmp", ["L", "RGB", "P", "1"]),
    ("TIFF", ".tif", ["L", "RGB", "I;16", "F", "1"]),
] for mode in modes}
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"GIF89a"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _check_readers(path) -> None:
    """Each reader returns its documented array or raises InputError naming the file; nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about odd chunks on the way to its verdict
        try:
            image = read_image(path)
        except InputError as e:
            assert str(path) in str(e)
        else:
            assert image.dtype == np.float32 and image.ndim == 2
        try:
            mask = read_mask(path)
        except InputError as e:
            assert str(path) in str(e)
        else:
            assert mask.dtype == np.uint8 and mask.ndim == 2 and set(np.unique(mask)) <= {0, 1}


@READERS
@given(st.binary(max_size=4096), st.sampled_from(IMAGE_SUFFIXES))
def test_random_bytes_never_crash_the_readers(folder, data, suffix):
    path = folder / f"random{suffix}"
    path.write_bytes(data)
    _check_readers(path)


@READERS
@given(st.sampled_from(MAGIC), st.binary(max_size=4096), st.sampled_from(IMAGE_SUFFIXES))
def test_a_valid_signature_then_random_bytes_never_crash_the_readers(folder, magic, data, suffix):
    path = folder / f"magic{suffix}"
    path.write_bytes(magic + data)
    _check_readers(path)


@READERS
@given(st.sampled_from(sorted(VALID)), st.data())
def test_truncated_valid_files_never_crash_the_readers(folder, key, data):
    ext, blob = VALID[key]
    cut = data.draw(st.integers(0, len(blob) - 1))
    path = folder / f"cut{ext}"
    path.write_bytes(blob[:cut])
    _check_readers(path)


@READERS
@given(st.sampled_from(sorted(VALID)), st.data())
def test_corrupted_valid_files_never_crash_the_readers(folder, key, data):
    ext, blob = VALID[key]
    damaged = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        damaged[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    path = folder / f"corrupt{ext}"
    path.write_bytes(bytes(damaged))
    _check_readers(path)


@pytest.mark.parametrize("key", sorted(VALID))
def test_every_valid_file_used_above_reads(folder, key):
    ext, blob = VALID[key]
    path = folder / f"valid{ext}"
    path.write_bytes(blob)
    assert read_image(path).shape == read_mask(path).shape == (13, 17)
