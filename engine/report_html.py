"""A report to look at: OUT/<case>_report.html per scan and OUT/index.html over a batch.

Each page is self-contained, so it opens offline from a shared folder (no server, no network): the slices
are base64 PNG data URIs, the bar chart is SVG drawn here, and a small inline script scrolls the slices.
The CT and each mask are separate stacked <img> layers, so toggling an overlay recomputes nothing.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from base import atomic_write
from data.labels import LESION_TYPES, structure_slug
from utils.volumes import ZONES, split_lungs

LUNG_WINDOW = (-1350.0, 150.0)  # HU: the usual lung window, level -600 / width 1500
MAX_WIDTH = 256  # px per slice: a 512x512x300 scan stays well under 30 MB
MASK_OPACITY = 0.45
LUNG_SHADES = ((60, 200, 60), (30, 130, 90))  # patient's right, left lung
# the lesion red; ground-glass opacity yellow and consolidation orange (data.labels.LESION_TYPES, by value)
MASK_COLOURS = {"lesion": (255, 40, 40), **{structure_slug(name): colour for name, colour in
                                            zip(sorted(LESION_TYPES, key=LESION_TYPES.get), ((255, 210, 40), (255, 120, 0)))}}
OTHER_COLOUR = (220, 60, 220)
BLANK = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAACH5BAEAAAAALAAAAAABAAEAAAIBRAA7"  # 1x1 transparent
HEADLINE = ("case", "file", "checkpoint", "lung_source", "lesion_ml", "lesion_ml_outside_lungs", "lung_ml",
            "lung_right_ml", "lung_left_ml", "infection_percent", "infection_percent_right", "infection_percent_left", "high_opacity_percent",
            "high_opacity_percent_right", "high_opacity_percent_left", "slices_with_lesion", "n_slices")
SIDES = ("right", "left")
# PNG encoding (zlib) and numpy release the GIL: threads encode slices side by side (5 s -> 2.5 s on 2 cores
# for a 512x512x300 scan); the pages are byte for byte the same
THREADS = min(4, os.cpu_count() or 1)


def fmt(value) -> str:
    """A report value as the page shows it: numbers to 2 decimals, None as a dash."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def _png_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _per_slice(fn, slices) -> list[str]:
    """``fn`` over the slices, in order, on THREADS threads."""
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(fn, slices))


def _mask_layer(labels: np.ndarray, size: tuple[int, int], colours) -> list[str]:
    """Palette PNGs of a (Z, H, W) label map (0 transparent, label i in colours[i-1]); BLANK for empty slices."""
    palette = [0, 0, 0] + [c for rgb in colours for c in rgb]

    def uri(labels_z: np.ndarray) -> str:
        if not labels_z.any():
            return BLANK  # most slices of a lesion layer are empty: one shared constant, no PNG
        img = Image.fromarray(labels_z.astype(np.uint8)).resize(size, Image.NEAREST).convert("P")
        img.putpalette(palette)
        img.info["transparency"] = 0
        return _png_uri(img)

    return _per_slice(uri, labels)


def slice_layers(hu: np.ndarray, masks: dict[str, np.ndarray], types: dict[str, int] | None = None) -> dict[str, list[str]]:
    """One PNG data URI per slice and layer: "ct" (lung window, grey) and one layer per mask.

    Args:
        hu: (Z, H, W) HU slices in display orientation (data.readers' Volume.image).
        masks: {name: (Z, H, W) mask} in the same orientation; "lung" may be binary or 1-left/2-right.
        types: {lesion type name: label value} when masks["lesion"] is a label map of lesion types: one
            layer per type (named by data.labels.structure_slug), each in its colour, in place of "lesion".
    Returns:
        {layer: [Z data URIs]}, slices downsampled to at most MAX_WIDTH px wide.
    """
    z, h, w = hu.shape
    width = min(w, MAX_WIDTH)
    size = (width, max(1, round(h * width / w)))
    lo, hi = LUNG_WINDOW

    def ct_uri(hu_z: np.ndarray) -> str:  # windowed slice by slice: no 300 MB float copies of the scan
        grey = (np.clip((hu_z - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)
        return _png_uri(Image.fromarray(grey).resize(size, Image.BILINEAR))

    layers = {"ct": _per_slice(ct_uri, hu)}
    if "lung" in masks:
        right, left = split_lungs(masks["lung"])
        layers["lung"] = _mask_layer(right * np.uint8(1) + left * np.uint8(2), size, LUNG_SHADES)
    for name, mask in masks.items():
        if name == "lesion" and types:
            for kind, value in sorted(types.items(), key=lambda item: item[1]):
                slug = structure_slug(kind)
                layers[slug] = _mask_layer(np.asarray(mask) == value, size, [MASK_COLOURS.get(slug, OTHER_COLOUR)])
        elif name != "lung":
            layers[name] = _mask_layer(np.asarray(mask) > 0, size, [MASK_COLOURS.get(name, OTHER_COLOUR)])
    return layers


def type_keys(report: dict) -> list[str]:
    """The report's figures of each lesion type (utils.volumes.type_report), in label order; [] without types."""
    types = report.get("lesion_labels") or {}
    slugs = [structure_slug(n) for n in sorted(types, key=types.get)]
    return [f"{slug}{suffix}" for slug in slugs for suffix in ("_ml", "_percent", "_percent_right", "_percent_left")]


def bar_chart_svg(report: dict, width: int = 420, height: int = 180) -> str:
    """Inline SVG: infection % of each lung per zone (upper, middle, lower), one bar each."""
    bars = [(f"{side[0].upper()} {zone}", report.get(f"infection_percent_{side}_{zone}"))
            for side in SIDES for zone in reversed(ZONES)]
    top = max([v for _, v in bars if v is not None] + [1.0])
    pad, base = 30, height - 30
    step = (width - pad) / len(bars)
    parts = [f'<svg width="{width}" height="{height}" role="img" '
             f'aria-label="infection percent per lung and zone">',
             f'<line x1="{pad}" y1="{base}" x2="{width}" y2="{base}" stroke="#888"/>']
    for i, (label, value) in enumerate(bars):
        x = pad + i * step + step * 0.15
        bar = 0.0 if value is None else (base - 15) * value / top
        colour = "#3cc83c" if label.startswith("R") else "#1e825a"
        parts += [f'<rect x="{x:.1f}" y="{base - bar:.1f}" width="{step * 0.7:.1f}" height="{bar:.1f}" '
                  f'fill="{colour}"/>',
                  f'<text x="{x + step * 0.35:.1f}" y="{base - bar - 3:.1f}" font-size="11" '
                  f'text-anchor="middle">{fmt(value)}</text>',
                  f'<text x="{x + step * 0.35:.1f}" y="{base + 14}" font-size="11" '
                  f'text-anchor="middle">{html.escape(label)}</text>']
    parts.append('<text x="2" y="12" font-size="11">infection %</text></svg>')
    return "".join(parts)


def _numbers(report: dict) -> str:
    """The headline figures and the per-zone table, as HTML."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt(report[k]))}</td></tr>"
                   for k in (*HEADLINE, *type_keys(report)) if k in report)
    zones = list(reversed(ZONES))
    head = "".join(f"<th>{z}</th>" for z in zones)
    body = "".join(f"<tr><th>{side} lung</th>"
                   + "".join(f"<td>{html.escape(fmt(report.get(f'infection_percent_{side}_{z}')))} % "
                             f"({html.escape(fmt(report.get(f'lesion_ml_{side}_{z}')))} mL)</td>" for z in zones)
                   + "</tr>" for side in SIDES)
    return (f'<table class="numbers">{rows}</table>'
            f'<table class="zones"><tr><th>infection % (lesion mL)</th>{head}</tr>{body}</table>')


def _script_json(value) -> str:
    """JSON safe inside a <script> element ("</" would end it)."""
    return json.dumps(value).replace("</", "<\\/")


_STYLE = """body{font-family:sans-serif;margin:1em;color:#222}table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:left;font-size:13px}
.viewer{position:relative;width:512px;max-width:100%;background:#000}
.viewer img{position:absolute;left:0;top:0;width:100%;image-rendering:pixelated}
.viewer img.base{position:relative;display:block}.viewer img.mask{opacity:""" + str(MASK_OPACITY) + "}"

_SCRIPT = """const S = JSON.parse(document.getElementById("slices").textContent);
const n = S.ct.length, slider = document.getElementById("z");
function show(z) {
  z = Math.max(0, Math.min(n - 1, z)); slider.value = z;
  for (const k in S) document.getElementById("layer-" + k).src = S[k][z];
  document.getElementById("where").textContent = "slice " + (z + 1) + " of " + n;
}
slider.addEventListener("input", () => show(+slider.value));
document.addEventListener("keydown", e => {
  if (e.key === "ArrowRight" || e.key === "ArrowUp") { show(+slider.value + 1); e.preventDefault(); }
  if (e.key === "ArrowLeft" || e.key === "ArrowDown") { show(+slider.value - 1); e.preventDefault(); }
});
for (const box of document.querySelectorAll("input[data-layer]"))
  box.addEventListener("change", () => {
    document.getElementById("layer-" + box.dataset.layer).style.visibility = box.checked ? "visible" : "hidden";
  });
show(+slider.value);"""


def report_html(hu: np.ndarray, masks: dict[str, np.ndarray], report: dict) -> str:
    """The self-contained report page of one scan.

    Args:
        hu: (Z, H, W) HU slices in display orientation; masks: {name: (Z, H, W)} in the same orientation.
        report: the scan's report (as written to <case>_report.json); embedded verbatim as JSON.
    Returns:
        the HTML text; the viewer opens on the slice with the most lesion.
    """
    layers = slice_layers(hu, masks, report.get("lesion_labels"))
    main = masks.get("lesion", masks.get("lung"))
    start = int(np.argmax(main.reshape(len(main), -1).sum(1))) if main is not None and main.any() else len(hu) // 2
    imgs = "".join(f'<img id="layer-{k}" class="{"base" if k == "ct" else "mask"}" alt="{k}" src="{BLANK}">'
                   for k in layers)
    boxes = "".join(f'<label><input type="checkbox" data-layer="{k}" checked> {k}</label> '
                    for k in layers if k != "ct")
    title = html.escape(f"{report.get('case', '')}: lesion and lung report")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
            f"{_numbers(report)}{bar_chart_svg(report)}"
            f'<p>{boxes}<span id="where"></span> (slider or arrow keys; inferior first)</p>'
            f'<input type="range" id="z" min="0" max="{len(hu) - 1}" value="{start}" style="width:512px">'
            f'<div class="viewer">{imgs}</div>'
            f'<script type="application/json" id="report">{_script_json(report)}</script>'
            f'<script type="application/json" id="slices">{_script_json(layers)}</script>'
            f"<script>{_SCRIPT}</script></body></html>")


def write_report_html(hu: np.ndarray, masks: dict[str, np.ndarray], report: dict, path: Path) -> None:
    """Write :func:`report_html` to ``path``, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(report_html(hu, masks, report), encoding="utf-8")


def index_html(cases: list[tuple[str, str, dict]]) -> str:
    """A batch's index page: one row per (case, report href, report), by infection % descending, no lungs last."""
    def key(item):
        pct = item[2].get("infection_percent")
        return (pct is None, -(pct or 0.0), item[0])

    typed = list(dict.fromkeys(k for _, _, report in cases for k in type_keys(report) if k.endswith("_percent")))
    cols = ("lesion_ml", "lung_ml", "infection_percent", "infection_percent_right", "infection_percent_left",
            *typed, "high_opacity_percent", "lung_source")
    head = "".join(f"<th>{c}</th>" for c in ("case", *cols))
    rows = "".join(f'<tr><td><a href="{html.escape(href)}">{html.escape(case)}</a></td>'
                   + "".join(f"<td>{html.escape(fmt(report.get(c)))}</td>" for c in cols) + "</tr>"
                   for case, href, report in sorted(cases, key=key))
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>infer.py reports</title>'
            f"<style>{_STYLE}</style></head><body><h1>{len(cases)} scan(s), by infection</h1>"
            f"<table>{'<tr>' + head + '</tr>'}{rows}</table></body></html>")


def write_index_html(cases: list[tuple[str, str, dict]], path: Path) -> None:
    """Write :func:`index_html` to ``path``, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(index_html(cases), encoding="utf-8")
