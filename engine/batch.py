"""Batch inference: masks, reports and montages for images and volumes, written as a resumable batch.

Folders run as a batch, as nnU-Net's and TotalSegmentator's predictors do: after each case the output
folder's infer_manifest.json (and report.csv) lists it as done or failed; a rerun skips the cases already
done with the same checkpoints and settings. Only files infer.py wrote itself (listed in the manifest, or
PNGs carrying its marker) are replaced, unless ``overwrite``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from base import check_disjoint, exclusive_lock
from data.transforms import IMAGE_SUFFIXES, InputError, case_name, nifti_gz_bytes, resize_masks
from data.labels import TASK_OUTPUTS
from data.readers import read_case
from engine.predict import Predictor, main_structure
from engine.report_html import write_index_html, write_report_html
from base import atomic_write
from utils.helpers import mask_to_png, overlay, write_csv
from utils.lungs import extract_lungs
from utils.volumes import volume_report

MANIFEST = "infer_manifest.json"
INDEX = "index.html"  # a batch's page linking every case's <case>_report.html
LUNG_SOURCES = ("auto", "model", "hu")  # infer.py --lungs
PNG_MARK = "infer.py lesion segmentation"  # "Software" text chunk of every PNG infer.py writes


def montage(images: np.ndarray, masks: dict[str, np.ndarray], n: int = 6, cols: int = 3) -> np.ndarray:
    """Overlays of the ``n`` axial slices with the most lesion (lesion red, lung green), tiled; uint8 RGB."""
    main = masks.get("lesion", masks.get("lung"))
    area = main.reshape(len(main), -1).sum(1)
    picks = sorted(np.argsort(-area, kind="stable")[:n])
    size = images.shape[1:]
    tiles = []
    for z in picks:
        small = {k: resize_masks(m[z][None], size)[0].numpy() for k, m in masks.items()}
        tile = overlay(images[z], small.get("lung", np.zeros(size, np.uint8)), (60, 200, 60), 0.25)
        tiles.append(overlay(tile, small.get("lesion", np.zeros(size, np.uint8))))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + cols], axis=1) for i in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)


def save_nifti_mask(mask: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    """Write a uint8 mask with the reference image's affine (so its orientation), atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(nifti_gz_bytes(mask.astype(np.uint8), like.affine))


# ----------------------------------------------------------------------------- what infer.py may replace
def save_marked_png(array: np.ndarray, path: Path) -> None:
    """Save a uint8 (H, W) or (H, W, 3) array as PNG, atomically, marked as infer.py's (so a rerun may replace it)."""
    info = PngInfo()
    info.add_text("Software", PNG_MARK)
    with atomic_write(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", pnginfo=info)


def written_by_infer(path: Path) -> bool:
    """True for a PNG that infer.py wrote (it carries the marker of :func:`save_marked_png`)."""
    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == PNG_MARK
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def _refuse(path: Path) -> InputError:
    return InputError(f"{path}: exists and infer.py did not write it; choose another --output, or pass --overwrite "
                      f"to replace it")


def _stamp(path: Path) -> list[int]:
    """(size, mtime) of a file: a rerun redoes a case whose input or checkpoint changed since."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def run_settings(checkpoint, predictor: Predictor, threshold: float, save_probs=None) -> dict:
    """What a done case depends on besides its input: a rerun with other settings redoes every case."""
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    return {"checkpoints": [[str(Path(p).resolve()), *_stamp(p)] for p in paths], "threshold": threshold,
            "tta": predictor.tta, "save_probs": str(Path(save_probs).resolve()) if save_probs else None}


class OutputFolder:
    """What infer.py wrote into an output folder, kept in OUT/infer_manifest.json after every case.

    The manifest holds each case (input, status "done" or "failed", outputs, error, report), every file
    infer.py wrote there, the run's settings, and ``complete``: true only once a run finished every case.
    With ``table``, OUT/report.csv lists the cases too, one row each, with a status column.

    Args:
        folder: the output folder (created on the first write).
        settings: :func:`run_settings`; done cases of a run with other settings are redone.
        overwrite: replace files infer.py did not write, and redo done cases.
    """

    def __init__(self, folder: Path, settings: dict, overwrite: bool = False, table: bool = False):
        self.folder, self.settings, self.overwrite, self.table = Path(folder), settings, overwrite, table
        self.path = self.folder / MANIFEST
        old = self._read()
        self.files = set(old.get("files", []))
        keep = old.get("settings") == settings and not overwrite
        self.cases = {k: c for k, c in old.get("cases", {}).items() if keep and c.get("status") == "done"}

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            old = json.loads(self.path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("written_by") == "infer.py":
            return old
        if self.overwrite:
            return {}
        raise _refuse(self.path)

    def _rel(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.folder).as_posix()
        except ValueError:  # --save-probs maps live elsewhere
            return str(path)

    def check(self, paths) -> None:
        """Refuse, before anything is written, a path that exists and that infer.py did not write."""
        if self.overwrite:
            return
        for path in [self.path, *([self.folder / "report.csv"] if self.table else []), *paths]:
            if (path.exists() or path.is_symlink()) and not (self._rel(path) in self.files or written_by_infer(path)):
                raise _refuse(path)

    def done(self, key: str, src: Path) -> bool:
        """True when ``key`` was done from this very input, with these settings, and its outputs are there."""
        case = self.cases.get(key)
        return (case is not None and case["status"] == "done" and case["input_stamp"] == _stamp(src)
                and all((self.folder / f).exists() for f in case["outputs"]))

    def record(self, key: str, src: Path, outputs=(), error: str | None = None, report: dict | None = None) -> None:
        """Note one finished ("done") or failed (``error``) case, and save the manifest at once."""
        outputs = [self._rel(p) for p in outputs]
        self.files.update(outputs)
        self.cases[key] = {"input": str(src), "input_stamp": _stamp(src) if src.exists() else None,
                           "status": "failed" if error else "done", "outputs": outputs, "error": error,
                           "report": report}
        self.save()

    def save(self, complete: bool = False) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files.update([MANIFEST, *(["report.csv"] if self.table else [])])
        manifest = {"written_by": "infer.py", "complete": complete, "settings": self.settings,
                    "files": sorted(self.files), "cases": self.cases}
        with atomic_write(self.path) as tmp:  # the manifest first: it must list report.csv before that exists
            tmp.write_text(json.dumps(manifest, indent=1))
        if self.table:
            rows = [{"case": k, "file": c["input"], "status": c["status"], "error": c["error"] or "",
                     **{n: v for n, v in (c["report"] or {}).items() if not isinstance(v, list)}}
                    for k, c in self.cases.items()]
            columns = list(dict.fromkeys(col for r in rows for col in r))
            write_csv([{col: r.get(col, "") for col in columns} for r in rows], self.folder / "report.csv")


def _finish(folder: OutputFolder, keys: list[str], failed: dict[str, str], what: str) -> None:
    """Mark the folder complete when every case is done; otherwise one line naming each failed file."""
    folder.save(complete=not failed and all(folder.cases.get(k, {}).get("status") == "done" for k in keys))
    if failed:
        raise InputError(f"{len(failed)} of {len(keys)} {what} failed, the others are done in {folder.folder}/ "
                         f"(report.csv, {MANIFEST}): " + "; ".join(failed.values()))


def _interrupted(folder: OutputFolder, keys: list[str]) -> KeyboardInterrupt:
    n = sum(folder.cases.get(k, {}).get("status") == "done" for k in keys)
    return KeyboardInterrupt(f"interrupted: {n} of {len(keys)} cases are done in {folder.folder}/ (listed in "
                             f"{MANIFEST}, marked incomplete); run the same command again to do the rest")


# ----------------------------------------------------------------------------- volumes
def lung_source(task: str, lungs: str = "auto") -> str:
    """Where the lung mask of a volume comes from: "model" (the checkpoint's lung head) or "hu".

    Args:
        lungs: "auto" (the model's lung head when it has one, else HU), "model" or "hu" (utils.lungs).
    """
    if lungs not in LUNG_SOURCES:
        raise InputError(f"--lungs must be one of {', '.join(LUNG_SOURCES)}, got {lungs!r}")
    has_head = "lung" in TASK_OUTPUTS[task]
    if lungs == "model" and not has_head:
        raise InputError(f"--lungs model: this checkpoint (task {task!r}) has no lung head; use --lungs auto or hu")
    return "model" if has_head and lungs != "hu" else "hu"


def infer_one_volume(predictor: Predictor, vol: Path, case: str, out: Path, threshold: float, checkpoint,
                     series: str | None = None, lungs: str = "auto") -> dict:
    """Predict one volume and write its masks, report and montage into ``out``; returns the report.

    The lung mask is the model's or, per :func:`lung_source`, extracted from HU (utils.lungs, the predicted
    lesions added); the report says which ("lung_source").
    """
    volume, images, masks = predictor.predict_volume(read_case(vol, prep=predictor.prep, series=series), threshold)
    source = lung_source(predictor.task, lungs)
    if source == "hu":
        masks["lung"] = extract_lungs(volume.image, lesion=masks.get("lesion"))
    out.mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():  # the mask keeps the file's own shape, (X, Y, Z) or (X, Y, Z, 1)
        save_nifti_mask(volume.to_file_order(mask), volume.img, out / f"{case}_{name}.nii.gz")
    report = {"case": case, "file": str(vol), "threshold": threshold,
              "checkpoint": [str(c) for c in checkpoint] if isinstance(checkpoint, (list, tuple)) else str(checkpoint),
              "shape": list(volume.file_shape), "spacing_mm": volume.spacing,
              "lung_source": source,
              **volume_report(masks.get("lesion"), masks.get("lung"), volume.voxel_ml, hu=volume.image)}
    with atomic_write(out / f"{case}_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    save_marked_png(montage(images, masks), out / f"{case}_montage.png")
    write_report_html(volume.image, masks, report, out / f"{case}_report.html")
    pct = report["infection_percent"]
    print(f"{case}: lesion {report['lesion_ml'] or 0:.1f} mL"
          + (f", lung {report['lung_ml']:.1f} mL, infection {pct:.2f}% (left {report['infection_percent_left'] or 0:.2f}%, "
             f"right {report['infection_percent_right'] or 0:.2f}%)" if pct is not None else f"; {report.get('note', '')}"))
    return report


def infer_volumes(predictor: Predictor, volumes: list[Path], out: Path, threshold: float,
                  checkpoint: str | Path, progress: bool = True, overwrite: bool = False,
                  batch: bool | None = None, series: str | None = None, lungs: str = "auto") -> list[Path]:
    """Masks, a report and a montage per volume; for a batch also OUT/report.csv.

    Writes OUT/<case>_lesion.nii.gz and/or OUT/<case>_lung.nii.gz (uint8, the scan's own shape, affine and
    orientation), OUT/<case>_report.json and OUT/<case>_montage.png, and OUT/infer_manifest.json. In a
    ``batch`` (default: several volumes) a volume that cannot be read is reported and the others go on;
    cases already done are skipped (see :class:`OutputFolder`). A volume is a NIfTI file or a DICOM series (a
    folder or a .zip; ``series`` picks one of several). ``lungs``: see :func:`lung_source`; a lung mask is
    written for every volume, from HU where the checkpoint has no lung head. Returns the mask paths of the
    done cases.
    """
    batch = len(volumes) > 1 if batch is None else batch
    cases = [v.name if v.is_dir() else case_name(v) for v in volumes]  # a DICOM folder: the folder's name
    clash = sorted({c for c in cases if cases.count(c) > 1})
    if clash:  # a.nii and a.nii.gz would write each other's masks
        raise InputError(f"{volumes[0].parent}: several volumes share the case name {clash[0]!r}; rename or move one")
    names = tuple(dict.fromkeys(TASK_OUTPUTS[predictor.task] + ("lung",)))  # lungs from HU without a lung head
    lung_source(predictor.task, lungs)  # a bad --lungs fails before anything is written
    outputs = {c: [out / f"{c}_{n}.nii.gz" for n in names] + [out / f"{c}_report.json", out / f"{c}_montage.png",
                                                             out / f"{c}_report.html"]
               for c in cases}
    folder = OutputFolder(out, {**run_settings(checkpoint, predictor, threshold), "lungs": lungs}, overwrite,
                          table=batch)
    todo = [(c, v) for c, v in zip(cases, volumes) if not folder.done(v.name, v)]
    folder.check([p for c, _ in todo for p in outputs[c]] + ([out / INDEX] if batch else []))
    if len(todo) < len(volumes):
        print(f"skipping {len(volumes) - len(todo)} volume(s) already done in {out}/ (--overwrite redoes them)")
    if batch:  # a single volume writes nothing until it is done, so a bad one leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
    keys, failed = [v.name for v in volumes], {}
    with exclusive_lock(out, "another infer.py run") if batch else contextlib.nullcontext():
        try:
            if batch:
                folder.files.add(INDEX)  # listed before it exists, as report.csv is
                folder.save()  # from the start, the folder says it is incomplete
            for case, vol in tqdm(todo, desc="volumes", disable=True if (not progress or len(todo) <= 1) else None):
                try:
                    report = infer_one_volume(predictor, vol, case, out, threshold, checkpoint, series, lungs)
                except InputError as e:
                    if not batch:
                        raise
                    failed[vol.name] = str(e)
                    folder.record(vol.name, vol, error=str(e))
                    continue
                folder.record(vol.name, vol, outputs[case], report={k: v for k, v in report.items()
                                                                    if k not in ("case", "file")})
            written = [p for c, v in zip(cases, volumes) if folder.done(v.name, v) for p in outputs[c][:len(names)]]
            print(f"{len(written) // len(names)} of {len(volumes)} volume(s) done: masks, reports and montages in "
                  f"{out}/" + (" (summary: report.csv, index.html)" if batch else ""))
            if batch:
                _write_index(folder, keys)
            _finish(folder, keys, failed, "volumes")
        except KeyboardInterrupt:
            raise _interrupted(folder, keys) from None
    return written


def _write_index(folder: OutputFolder, keys: list[str]) -> None:
    """OUT/index.html: a link to the report page of every done case (one done before the pages existed has none)."""
    cases = []
    for key in keys:
        case = folder.cases.get(key, {})
        pages = [o for o in case.get("outputs", []) if o.endswith("_report.html")]
        if case.get("status") == "done" and pages and (folder.folder / pages[0]).exists():
            cases.append((pages[0][:-len("_report.html")], pages[0], case["report"] or {}))
    write_index_html(cases, folder.folder / INDEX)


# ----------------------------------------------------------------------------- 2D images
def image_files(folder: Path) -> list[Path]:
    """The image files of a folder, sorted; refuses a folder without any, or two that would share a mask name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: no images ({'/'.join(IMAGE_SUFFIXES)}) or NIfTI volumes found")
    stems = [p.stem for p in files]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:  # masks are named <stem>.png: two inputs with one stem would overwrite each other's mask
        raise InputError(f"{folder}: several images share the name {clash[0]!r} ({', '.join(p.name for p in files if p.stem == clash[0])}); "
                         f"masks are named <name>.png, so rename or move one")
    return files


def _write_image_outputs(path: Path, image: np.ndarray, probs: dict, main: str, threshold: float,
                         mask_path: Path, overlay_path: Path, prob_path: Path | None) -> None:
    mask = (probs[main] > threshold).astype(np.uint8)
    save_marked_png(mask_to_png(mask), mask_path)
    save_marked_png(overlay(image / max(float(image.max()), 1e-6), mask), overlay_path)
    if prob_path is not None:  # 8-bit probability map, 0..255, named like the mask
        save_marked_png(np.round(probs[main] * 255).astype(np.uint8), prob_path)


def infer_image_folder(predictor: Predictor, paths: list[Path], out: Path, threshold: float, checkpoint,
                       save_probs: str | Path | None = None, progress: bool = True,
                       overwrite: bool = False) -> list[Path]:
    """Masks OUT/<name>.png and overlays OUT/overlays/<name>.png for image files, as a batch.

    After each image OUT/infer_manifest.json and OUT/report.csv say it is done (or failed, and why); an
    image that cannot be read does not stop the others; images already done are skipped (see
    :class:`OutputFolder`). Raises InputError at the end, naming each failed file, if any failed.
    Returns the mask paths of all done images.
    """
    main = main_structure(predictor.task)
    outputs = {p.name: [out / f"{p.stem}.png", out / "overlays" / f"{p.stem}.png"]
               + ([Path(save_probs) / f"{p.stem}.png"] if save_probs else []) for p in paths}
    folder = OutputFolder(out, run_settings(checkpoint, predictor, threshold, save_probs), overwrite, table=True)
    todo = [p for p in paths if not folder.done(p.name, p)]
    folder.check([f for p in todo for f in outputs[p.name]])
    if len(todo) < len(paths):
        print(f"skipping {len(paths) - len(todo)} image(s) already done in {out}/ (--overwrite redoes them)")
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    if save_probs:
        Path(save_probs).mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}

    def on_error(path: Path, message: str) -> None:
        failed[path.name] = message
        folder.record(path.name, path, error=message)

    keys = [p.name for p in paths]
    with exclusive_lock(out, "another infer.py run"):
        folder.save()  # from the start, the folder says it is incomplete
        try:
            for path, image, probs in tqdm(predictor.predict_images(todo, on_error), total=len(todo), desc="infer",
                                           unit="img", disable=True if (not progress or len(todo) <= 1) else None):
                mask_path, overlay_path, *prob_path = outputs[path.name]
                _write_image_outputs(path, image, probs, main, threshold, mask_path, overlay_path,
                                     prob_path[0] if prob_path else None)
                folder.record(path.name, path, outputs[path.name], report={"mask": mask_path.name})
            written = [outputs[p.name][0] for p in paths if folder.done(p.name, p)]
            print(f"wrote {out}/ ({len(written)} of {len(paths)} masks done, overlays in {out}/overlays/, "
                  f"report.csv)")
            _finish(folder, keys, failed, "images")
        except KeyboardInterrupt:
            raise _interrupted(folder, keys) from None
    return written



# ----------------------------------------------------------------------------- one 2D image
def infer_image(predictor: Predictor, src: Path, output: str | Path | None, threshold: float,
                save_probs: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """The mask of one image file (default prediction_mask.png) and its overlay (<mask>_overlay.png).

    ``output`` is the mask file, or a folder (an existing one, or a name without suffix) that gets
    <name>.png. Returns [the mask path].
    """
    target = Path(output) if output else Path("prediction_mask.png")
    if target.is_dir() or not target.suffix:
        target = target / f"{src.stem}.png"
    overlay_path = target.with_name(target.stem + "_overlay.png")
    prob_path = Path(save_probs) / target.name if save_probs else None
    for path in filter(None, (target, overlay_path, prob_path)):
        check_disjoint(path, [src], "--output")
        if (path.exists() or path.is_symlink()) and not overwrite and not written_by_infer(path):
            raise _refuse(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if save_probs:
        Path(save_probs).mkdir(parents=True, exist_ok=True)
    main = main_structure(predictor.task)
    for path, image, probs in predictor.predict_images([src]):
        _write_image_outputs(path, image, probs, main, threshold, target, overlay_path, prob_path)
    print(f"wrote {target}")
    return [target]
