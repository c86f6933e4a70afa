"""Batch inference: masks, reports and montages for images and volumes, written as a resumable batch.

Folders run as a batch, as nnU-Net's and TotalSegmentator's predictors do: after each case the output
folder's infer_manifest.json (and report.csv) lists it as done or failed; a rerun skips the cases already
done with the same checkpoints and settings. Only files infer.py wrote itself (listed in the manifest, or
PNGs carrying its marker) are replaced, unless ``overwrite``.
"""
from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from base import atomic_write, check_disjoint, exclusive_lock
from data.labels import TASK_OUTPUTS, structure_slug, task_masks
from data.readers import read_case
from data.transforms import IMAGE_SUFFIXES, InputError, case_name, nifti_gz_bytes, resize_masks
from engine.dicom_seg import check_dicom_input, check_source, mask_labels, write_dicom_seg
from engine.predict import Predictor, lesion_types, main_structure, type_prediction, volume_masks
from engine.report_html import MASK_COLOURS, OTHER_COLOUR, write_index_html, write_report_html
from utils.cli import raise_if_interrupted
from utils.helpers import mask_to_png, overlay, write_csv
from utils.lungs import extract_lungs
from utils.volumes import volume_report

MANIFEST = "infer_manifest.json"
INDEX = "index.html"  # a batch's page linking every case's <case>_report.html
LUNG_SOURCES = ("auto", "model", "hu")  # infer.py --lungs
PNG_MARK = "infer.py lesion segmentation"  # "Software" text chunk of every PNG infer.py writes
# infer.py --lesion: what a lesion-types checkpoint writes; "types" label masks (0 none, 1 ground-glass
# opacity, 2 consolidation), "any" the union as a binary model's masks. A binary checkpoint writes the latter.
LESION_MODES = ("types", "any")


# ----------------------------------------------------------------------------- lesion types
def output_types(task: str, lesion: str = "types") -> dict[str, int]:
    """{type name: label value} of the lesion masks infer.py writes: the lesion types of a types task
    (engine.evaluation.lesion_types, the values of data.labels.type_mask), or {} for binary lesion masks
    (a binary task, or ``lesion="any"``)."""
    if lesion not in LESION_MODES:
        raise InputError(f"--lesion must be one of {', '.join(LESION_MODES)}, got {lesion!r}")
    return lesion_types(task) if lesion == "types" else {}


def type_colours(types: dict[str, int]) -> list[tuple[int, int, int]]:
    """The colour of each lesion type, in label order: the report page's (engine.report_html.MASK_COLOURS)."""
    return [MASK_COLOURS.get(structure_slug(name), OTHER_COLOUR) for name in sorted(types, key=types.get)]


def type_label_map(probs: dict, task: str, threshold: float) -> np.ndarray:
    """The lesion-type label map of probability maps: lesion where the union's probability is above
    ``threshold`` (so its union is the mask a binary reading gives), each lesion pixel the type of higher
    probability (engine.evaluation.type_prediction, the rule evaluation scores).

    Shape: {name: (..., H, W) array or tensor} -> uint8 (..., H, W).
    """
    tensors = {k: torch.as_tensor(v)[None] for k, v in probs.items()}
    return type_prediction(tensors, task, threshold)[0].numpy().astype(np.uint8)


def montage(images: np.ndarray, masks: dict[str, np.ndarray], n: int = 6, cols: int = 3,
            types: dict[str, int] | None = None) -> np.ndarray:
    """Overlays of the ``n`` axial slices with the most lesion (lesion red, lung green), tiled; uint8 RGB.

    ``types``: {type name: label value} when the lesion mask is a label map of lesion types, each type in
    its colour (:func:`type_colours`)."""
    main = masks.get("lesion", masks.get("lung"))
    area = main.reshape(len(main), -1).sum(1)
    picks = sorted(np.argsort(-area, kind="stable")[:n])
    size = images.shape[1:]
    tiles = []
    for z in picks:
        small = {k: resize_masks(m[z][None], size)[0].numpy() for k, m in masks.items()}
        tile = overlay(images[z], small.get("lung", np.zeros(size, np.uint8)), (60, 200, 60), 0.25)
        lesion = small.get("lesion", np.zeros(size, np.uint8))
        if types:
            for value, colour in zip(sorted(types.values()), type_colours(types)):
                tile = overlay(tile, lesion == value, colour)
            tiles.append(tile)
        else:
            tiles.append(overlay(tile, lesion))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i:i + cols], axis=1) for i in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)


def save_nifti_mask(mask: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    """Write a uint8 mask with the reference image's affine (so its orientation), atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(nifti_gz_bytes(mask.astype(np.uint8), like.affine))


# ----------------------------------------------------------------------------- what infer.py may replace
def save_marked_png(array: np.ndarray, path: Path, palette: list[tuple[int, int, int]] | None = None) -> None:
    """Save a uint8 (H, W) or (H, W, 3) array as PNG, atomically, marked as infer.py's (so a rerun may replace it).

    ``palette``: the colours of labels 1, 2, ... (0 black): a (H, W) label map saved as a palette PNG (mode
    "P", as COVID-SemiSeg's multi-class masks), whose pixel values stay the labels and viewers show colours.
    """
    info = PngInfo()
    info.add_text("Software", PNG_MARK)
    if palette is None:
        img = Image.fromarray(array)
    else:
        array = np.ascontiguousarray(array, dtype=np.uint8)
        img = Image.frombytes("P", array.shape[::-1], array.tobytes())
        img.putpalette([0, 0, 0] + [c for rgb in palette for c in rgb])
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)


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


def run_settings(checkpoint, predictor: Predictor, threshold: float, save_probs=None, lesion: str = "types") -> dict:
    """What a done case depends on besides its input: a rerun with other settings redoes every case.

    ``lesion`` (infer.py --lesion) is a setting of types checkpoints only, so binary runs keep their settings.
    """
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    settings = {"checkpoints": [[str(Path(p).resolve()), *_stamp(p)] for p in paths], "threshold": threshold,
                "tta": predictor.tta, "save_probs": str(Path(save_probs).resolve()) if save_probs else None}
    return {**settings, "lesion": lesion} if lesion_types(predictor.task) else settings


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
                     **{n: v for n, v in (c["report"] or {}).items() if not isinstance(v, (list, dict))}}
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


def _save_volume_mask(volume, mask: np.ndarray, path: Path) -> None:
    """A display-orientation mask saved in the file's own voxel order and shape ((X, Y, Z) or (X, Y, Z, 1))."""
    save_nifti_mask(volume.to_file_order(mask), volume.img, path)


def _save_volume_probs(volume, prob: torch.Tensor, path: Path) -> None:
    """A display-orientation probability map saved as the masks are, in 8 bits as the slices' maps: stored
    0..255 with the header's scl_slope 1/255, so viewers (and nibabel's get_fdata) show it as 0..1."""
    data = np.round(volume.to_file_order(prob.numpy()) * 255).astype(np.uint8)
    with atomic_write(path) as tmp:
        tmp.write_bytes(nifti_gz_bytes(data, volume.img.affine, slope=1 / 255))


def probs_apart(save_probs: str | Path | None, folder: Path) -> None:
    """Refuse --save-probs in the masks' own folder: the maps are named like the masks (:func:`prob_paths`)."""
    if save_probs and Path(save_probs).resolve() == Path(folder).resolve():
        raise InputError(f"--save-probs {save_probs}: the probability maps are named like the masks, so they need a "
                         f"folder other than the masks' ({folder}); choose another --save-probs")


def infer_one_volume(predictor: Predictor, vol: Path, case: str, out: Path, threshold: float, checkpoint,
                     series: str | None = None, lungs: str = "auto", dicom_seg: bool = False,
                     lesion: str = "types", save_probs: str | Path | None = None) -> dict:
    """Predict one volume and write its masks, report and montage into ``out``; returns the report.

    The lung mask is the model's or, per :func:`lung_source`, extracted from HU (utils.lungs, the predicted
    lesions added); the report says which ("lung_source"). ``dicom_seg``: also OUT/<case>_seg.dcm, the
    masks as a DICOM SEG over the source series (engine.dicom_seg); NIfTI input is refused before any output.
    A types checkpoint (``lesion`` "types", see :func:`output_types`) writes <case>_lesion.nii.gz as a
    label map of the lesion types (1 ground-glass opacity, 2 consolidation), one DICOM SEG segment each, and
    the report adds each type's mL and % of each lung (utils.volumes.type_report: ggo_ml, ggo_percent_left...).
    ``save_probs``: also the probability maps the masks were thresholded from, named like the lesion mask in
    that folder (:func:`prob_paths`, :func:`_save_volume_probs`), one per type for a types checkpoint.
    """
    types = output_types(predictor.task, lesion)
    if dicom_seg:
        check_dicom_input(vol)
    volume = read_case(vol, prep=predictor.prep, series=series)
    if dicom_seg:
        check_source(volume)
    volume, images, probs = predictor.volume_probs(volume)
    masks = volume_masks(probs, predictor.task, threshold, types=bool(types))
    main = main_structure(predictor.task)
    maps = dict(zip(prob_paths(save_probs, f"{case}_{main}.nii.gz", types), saved_maps(probs, predictor.task, types)))
    # the masks of the mask kinds only: a types checkpoint asked for the union has per-type masks too
    masks = {name: masks[name] for name in task_masks(predictor.task)}
    source = lung_source(predictor.task, lungs)
    if source == "hu":
        masks["lung"] = extract_lungs(volume.image, lesion=masks.get("lesion"))
    out.mkdir(parents=True, exist_ok=True)
    for folder in {p.parent for p in maps}:
        folder.mkdir(parents=True, exist_ok=True)
    seg = {}
    if dicom_seg:  # before the masks: a SEG that cannot be written leaves no half-written case
        paths = checkpoint if isinstance(checkpoint, (list, tuple)) else [checkpoint]
        version = ", ".join(Path(c).name for c in paths)  # the algorithm's version: the checkpoint file names
        seg = write_dicom_seg(masks, mask_labels(masks, source, types), volume, out / f"{case}_seg.dcm", version)
    # the masks are compressed on threads (zlib releases the GIL: 1-2 s each at 512x512x300) while the report
    # is computed; each file is written atomically, all of them before the report json, as before
    checkpoints = [str(c) for c in checkpoint] if isinstance(checkpoint, (list, tuple)) else str(checkpoint)
    with ThreadPoolExecutor(max_workers=len(masks) + len(maps)) as pool:
        writes = [pool.submit(_save_volume_mask, volume, mask, out / f"{case}_{name}.nii.gz")
                  for name, mask in masks.items()]
        writes += [pool.submit(_save_volume_probs, volume, prob, path) for path, prob in maps.items()]
        report = {"case": case, "file": str(vol), "threshold": threshold, "checkpoint": checkpoints,
                  "shape": list(volume.file_shape), "spacing_mm": volume.spacing,
                  "lung_source": source, **seg, **({"lesion_labels": types} if types else {}),
                  **volume_report(masks.get("lesion"), masks.get("lung"), volume.voxel_ml, hu=volume.image,
                                  types={structure_slug(name): value for name, value in types.items()})}
        for done in writes:
            done.result()  # a mask that failed to write fails the case here
    with atomic_write(out / f"{case}_report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    save_marked_png(montage(images, masks, types=types), out / f"{case}_montage.png")
    write_report_html(volume.image, masks, report, out / f"{case}_report.html")
    pct = report["infection_percent"]
    print(f"{case}: lesion {report['lesion_ml'] or 0:.1f} mL"
          + (f" ({report['lesion_ml_outside_lungs']:.1f} outside the lungs)" if pct is not None else "")
          + (f", lung {report['lung_ml']:.1f} mL, infection {pct:.2f}% (left {report['infection_percent_left'] or 0:.2f}%, "
             f"right {report['infection_percent_right'] or 0:.2f}%)" if pct is not None else f"; {report.get('note', '')}"))
    for name in types:
        slug = structure_slug(name)
        share = report[f"{slug}_percent"]
        print(f"  {name}: {report[f'{slug}_ml']:.1f} mL" + (f", {share:.2f}% of the lungs (left "
              f"{report[f'{slug}_percent_left'] or 0:.2f}%, right {report[f'{slug}_percent_right'] or 0:.2f}%)"
              if share is not None else ""))
    return report


def infer_volumes(predictor: Predictor, volumes: list[Path], out: Path, threshold: float,
                  checkpoint: str | Path, progress: bool = True, overwrite: bool = False,
                  batch: bool | None = None, series: str | None = None, lungs: str = "auto",
                  dicom_seg: bool = False, lesion: str = "types", save_probs: str | Path | None = None) -> list[Path]:
    """Masks, a report and a montage per volume; for a batch also OUT/report.csv.

    Writes OUT/<case>_lesion.nii.gz and/or OUT/<case>_lung.nii.gz (uint8, the scan's own shape, affine and
    orientation), OUT/<case>_report.json and OUT/<case>_montage.png, and OUT/infer_manifest.json. In a
    ``batch`` (default: several volumes) a volume that cannot be read is reported and the others go on;
    cases already done are skipped (see :class:`OutputFolder`). A volume is a NIfTI file or a DICOM series (a
    folder or a .zip; ``series`` picks one of several). ``lungs``: see :func:`lung_source`; a lung mask is
    written for every volume, from HU where the checkpoint has no lung head. ``dicom_seg``: also
    OUT/<case>_seg.dcm for DICOM input (see :func:`infer_one_volume`; a NIfTI volume fails as a bad input
    does). ``lesion``: what a types checkpoint writes (see :func:`output_types`, :func:`infer_one_volume`).
    ``save_probs``: a folder for the probability maps too (SAVE_PROBS/<case>_lesion.nii.gz, see
    :func:`infer_one_volume`). Returns the mask paths of the done cases.
    """
    batch = len(volumes) > 1 if batch is None else batch
    cases = [v.name if v.is_dir() else case_name(v) for v in volumes]  # a DICOM folder: the folder's name
    clash = sorted({c for c in cases if cases.count(c) > 1})
    if clash:  # a.nii and a.nii.gz would write each other's masks
        raise InputError(f"{volumes[0].parent}: several volumes share the case name {clash[0]!r}; rename or move one")
    names = tuple(dict.fromkeys(task_masks(predictor.task) + ("lung",)))  # lungs from HU without a lung head
    lung_source(predictor.task, lungs)  # a bad --lungs fails before anything is written
    types = output_types(predictor.task, lesion)  # and a bad --lesion
    probs_apart(save_probs, out)
    main = main_structure(predictor.task)
    outputs = {c: [out / f"{c}_{n}.nii.gz" for n in names] + [out / f"{c}_report.json", out / f"{c}_montage.png",
                                                             out / f"{c}_report.html"]
               + ([out / f"{c}_seg.dcm"] if dicom_seg else []) + prob_paths(save_probs, f"{c}_{main}.nii.gz", types)
               for c in cases}
    # the key only when asked: runs without --dicom-seg keep their settings, and so their done cases
    settings = {**run_settings(checkpoint, predictor, threshold, save_probs, lesion), "lungs": lungs,
                **({"dicom_seg": True} if dicom_seg else {})}
    folder = OutputFolder(out, settings, overwrite, table=batch)
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
                raise_if_interrupted()
                try:
                    report = infer_one_volume(predictor, vol, case, out, threshold, checkpoint, series, lungs,
                                              dicom_seg, lesion, save_probs)
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
                  f"{out}/" + (" (summary: report.csv, index.html)" if batch else "")
                  + (f", probability maps in {save_probs}/" if save_probs else ""))
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


def prob_paths(save_probs: str | Path | None, name: str, types: dict[str, int]) -> list[Path]:
    """Where the 8-bit probability maps of one image go: PROB/<name> for a binary mask, PROB/<type>/<name>
    per lesion type (data.labels.structure_slug: PROB/ggo/, PROB/consolidation/); none without --save-probs."""
    if not save_probs:
        return []
    if not types:
        return [Path(save_probs) / name]
    return [Path(save_probs) / structure_slug(t) / name for t in types]


def saved_maps(probs: dict, task: str, types: dict[str, int]) -> list:
    """The probability maps --save-probs writes, in :func:`prob_paths`' order: the main structure's, or with
    ``types`` one per lesion type."""
    return [probs[name] for name in types] or [probs[main_structure(task)]]


def _write_image_outputs(image: np.ndarray, probs: dict, task: str, threshold: float, mask_path: Path,
                         overlay_path: Path, probs_to: list[Path], types: dict[str, int]) -> None:
    """One image's mask (binary 0/255, or with ``types`` a palette PNG of type labels), overlay and
    probability maps (:func:`prob_paths`)."""
    shown = image / max(float(image.max()), 1e-6)
    if not types:
        mask = (probs[main_structure(task)] > threshold).astype(np.uint8)
        save_marked_png(mask_to_png(mask), mask_path)
        save_marked_png(overlay(shown, mask), overlay_path)
    else:
        labels = type_label_map(probs, task, threshold)
        colours = type_colours(types)
        save_marked_png(labels, mask_path, palette=colours)
        shown = overlay(shown, np.zeros(labels.shape, bool))  # RGB uint8 even when no type is seen
        for value, colour in zip(sorted(types.values()), colours):
            shown = overlay(shown, labels == value, colour)
        save_marked_png(shown, overlay_path)
    for prob, prob_path in zip(saved_maps(probs, task, types), probs_to):  # 8-bit probability maps, 0..255, named like the mask
        save_marked_png(np.round(prob * 255).astype(np.uint8), prob_path)


def infer_image_folder(predictor: Predictor, paths: list[Path], out: Path, threshold: float, checkpoint,
                       save_probs: str | Path | None = None, progress: bool = True,
                       overwrite: bool = False, lesion: str = "types") -> list[Path]:
    """Masks OUT/<name>.png and overlays OUT/overlays/<name>.png for image files, as a batch.

    A types checkpoint (``lesion`` "types", :func:`output_types`) writes label masks (palette PNGs: 0
    background, 1 ground-glass opacity, 2 consolidation), overlays with a colour per type and, with
    ``save_probs``, a probability map per type (:func:`prob_paths`); binary masks are white (255) lesion.

    After each image OUT/infer_manifest.json and OUT/report.csv say it is done (or failed, and why); an
    image that cannot be read does not stop the others; images already done are skipped (see
    :class:`OutputFolder`). Raises InputError at the end, naming each failed file, if any failed.
    Returns the mask paths of all done images.
    """
    types = output_types(predictor.task, lesion)
    probs_apart(save_probs, out)
    outputs = {p.name: [out / f"{p.stem}.png", out / "overlays" / f"{p.stem}.png"]
               + prob_paths(save_probs, f"{p.stem}.png", types) for p in paths}
    folder = OutputFolder(out, run_settings(checkpoint, predictor, threshold, save_probs, lesion), overwrite,
                          table=True)
    todo = [p for p in paths if not folder.done(p.name, p)]
    folder.check([f for p in todo for f in outputs[p.name]])
    if len(todo) < len(paths):
        print(f"skipping {len(paths) - len(todo)} image(s) already done in {out}/ (--overwrite redoes them)")
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    for prob_dir in {p.parent for p in prob_paths(save_probs, "x.png", types)}:
        prob_dir.mkdir(parents=True, exist_ok=True)
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
                raise_if_interrupted()
                mask_path, overlay_path, *probs_to = outputs[path.name]
                _write_image_outputs(image, probs, predictor.task, threshold, mask_path, overlay_path, probs_to,
                                     types)
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
                save_probs: str | Path | None = None, overwrite: bool = False, lesion: str = "types") -> list[Path]:
    """The mask of one image file (default prediction_mask.png) and its overlay (<mask>_overlay.png).

    ``output`` is the mask file, or a folder (an existing one, or a name without suffix) that gets
    <name>.png. ``lesion``: what a types checkpoint writes (see :func:`infer_image_folder`). Returns [the
    mask path].
    """
    types = output_types(predictor.task, lesion)
    target = Path(output) if output else Path("prediction_mask.png")
    if target.is_dir() or not target.suffix:
        target = target / f"{src.stem}.png"
    overlay_path = target.with_name(target.stem + "_overlay.png")
    probs_apart(save_probs, target.parent)
    probs_to = prob_paths(save_probs, target.name, types)
    for path in (target, overlay_path, *probs_to):
        check_disjoint(path, [src], "--output")
        if (path.exists() or path.is_symlink()) and not overwrite and not written_by_infer(path):
            raise _refuse(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for folder in {p.parent for p in probs_to}:
        folder.mkdir(parents=True, exist_ok=True)
    for _, image, probs in predictor.predict_images([src]):
        _write_image_outputs(image, probs, predictor.task, threshold, target, overlay_path, probs_to, types)
    print(f"wrote {target}")
    return [target]
