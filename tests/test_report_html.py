"""The report pages of infer.py: OUT/<case>_report.html per scan and OUT/index.html over a batch."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

import infer
from engine.report_html import BLANK, fmt, index_html, report_html
from tests.script_fixtures import phantoms, processed, trained  # noqa: F401


def embedded(page: str, element: str):
    """The JSON of <script type="application/json" id=ELEMENT> in a page."""
    match = re.search(rf'<script type="application/json" id="{element}">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def batch(trained, phantoms, tmp_path_factory):
    """infer.py over a folder of 3 phantom volumes (64x64x8): the output folder."""
    src, out = tmp_path_factory.mktemp("volumes"), tmp_path_factory.mktemp("report") / "out"
    for p in sorted((phantoms / "images").glob("*.nii.gz"))[:3]:
        shutil.copy(p, src / p.name)
    with contextlib.redirect_stdout(io.StringIO()):
        infer.infer(trained["out"] / "best_model.pth", src, out, device="cpu", progress=False)
    return out


def test_each_case_has_a_self_contained_page_with_one_image_per_slice_and_layer(batch):
    pages = sorted(batch.glob("*_report.html"))
    assert len(pages) == 3
    for page_path in pages:
        page = page_path.read_text()
        report = json.loads(page_path.with_name(page_path.name.replace(".html", ".json")).read_text())
        assert not re.search(r"https?://", page)  # opens offline: nothing fetched from anywhere
        assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', page))
        assert "<link" not in page and "@import" not in page and "url(" not in page
        layers = embedded(page, "slices")
        assert sorted(layers) == ["ct", "lesion", "lung"]
        for name, uris in layers.items():
            assert len(uris) == report["n_slices"] == 8, name
            assert all(u.startswith("data:image/png;base64,") or u == BLANK for u in uris)
        assert all(u != BLANK for u in layers["ct"])
        assert len(page) < 200_000  # a 64x64x8 phantom: tens of kB


def test_the_numbers_on_the_page_are_the_reports(batch):
    for page_path in sorted(batch.glob("*_report.html")):
        page = page_path.read_text()
        report = json.loads(page_path.with_name(page_path.name.replace(".html", ".json")).read_text())
        assert embedded(page, "report") == report
        for key in ("lesion_ml", "lung_ml", "infection_percent", "infection_percent_left", "infection_percent_right",
                    "infection_percent_left_upper", "infection_percent_right_lower", "lung_source", "case"):
            assert f"<td>{fmt(report[key])}" in page, key
        assert page.count("<rect") == 6  # the bar chart: 2 lungs x 3 zones


def test_index_lists_the_cases_by_infection_descending(batch):
    index = (batch / "index.html").read_text()
    links = re.findall(r'<a href="([^"]+)_report.html">', index)
    assert sorted(links) == sorted(p.name[:-len("_report.html")] for p in batch.glob("*_report.html"))
    pct = [json.loads((batch / f"{c}_report.json").read_text())["infection_percent"] for c in links]
    assert pct == sorted(pct, reverse=True)
    assert not re.search(r"https?://", index)
    manifest = json.loads((batch / "infer_manifest.json").read_text())
    assert {"index.html", *(f"{c}_report.html" for c in links)} <= set(manifest["files"])  # a rerun may replace them


def test_index_puts_cases_without_lungs_last():
    page = index_html([("none", "none_report.html", {"infection_percent": None}),
                       ("low", "low_report.html", {"infection_percent": 0.5}),
                       ("high", "high_report.html", {"infection_percent": 12.0})])
    assert re.findall(r'<a href="(\w+)_report.html">', page) == ["high", "low", "none"]


def test_empty_masks_and_no_lungs_still_make_a_page():
    hu = np.full((3, 20, 30), -800.0, np.float32)
    page = report_html(hu, {"lesion": np.zeros((3, 20, 30), np.uint8)}, {"case": "x", "infection_percent": None})
    layers = embedded(page, "slices")
    assert sorted(layers) == ["ct", "lesion"] and layers["lesion"] == [BLANK] * 3


def test_lesion_types_get_a_layer_each_and_their_numbers():
    hu = np.full((2, 20, 30), -800.0, np.float32)
    lesion = np.zeros((2, 20, 30), np.uint8)
    lesion[0, 2:6, 2:6] = 1  # ground-glass on slice 0 only
    lesion[1, 10:12, 3:9] = 2  # consolidation on slice 1 only
    types = {"ground-glass opacity": 1, "consolidation": 2}
    report = {"case": "t", "lesion_labels": types, "ggo_ml": 1.25, "consolidation_ml": 0.5, "ggo_percent": 3.0,
              "consolidation_percent": 1.0, "infection_percent": 4.0}
    page = report_html(hu, {"lesion": lesion, "lung": (lesion > 0).astype(np.uint8)}, report)
    layers = embedded(page, "slices")
    assert sorted(layers) == ["consolidation", "ct", "ggo", "lung"]  # one toggle per type, no union layer
    assert layers["ggo"][1] == BLANK and layers["ggo"][0] != BLANK
    assert layers["consolidation"][0] == BLANK and layers["consolidation"][1] != BLANK
    assert '<th>ggo_ml</th><td>1.25</td>' in page and '<th>consolidation_percent</th><td>1.00</td>' in page
    index = index_html([("t", "t_report.html", report)])
    assert "<th>ggo_percent</th>" in index and "<td>3.00</td>" in index


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (chromium, chromium-browser or google-chrome)")
def test_the_page_renders_in_a_headless_browser(batch, tmp_path):
    page = sorted(batch.glob("*_report.html"))[0]
    report = json.loads(page.with_name(page.name.replace(".html", ".json")).read_text())
    run = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-background-networking", "--no-first-run", f"--user-data-dir={tmp_path}",
                          "--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Uncaught" not in run.stderr, run.stderr[-2000:]
    # the script ran: it wrote the slice counter and gave every layer a slice image
    assert re.search(rf'id="where">slice \d+ of {report["n_slices"]}<', run.stdout), run.stdout[:2000]
    assert f"<td>{fmt(report['infection_percent'])}" in run.stdout
    assert len(re.findall(r'<img id="layer-\w+"[^>]*src="data:image/png', run.stdout)) >= 1
