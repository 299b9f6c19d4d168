"""Find CT datasets on disk and pair low dose with full dose: one :class:`CTDataset` of
:class:`SliceRecord` per data folder (reading one file is ``ctio``'s part).

Layouts understood by :func:`discover` (see the README for examples):

* ``mayo``  ``ROOT/<patient>/{quarter_*,full_*}/`` DICOM (or ``ROOT/{quarter_*,full_*}/`` for one
  patient). QD/FD paired by slice position, never by listing order.
* ``npy``   RED-CNN ``<patient>_<idx>_input.npy`` (QD) / ``_target.npy`` (FD), HU = v*4096 - 1024.
* ``tif``   CNCL ``noisy/`` (QD) and ``clean/`` (FD) with identical file names, float HU.
* ``dicom`` one unpaired DICOM series per folder (``ROOT/*.dcm`` or ``ROOT/<patient>/*.dcm``):
  low-dose input for inference, or full dose for simulation.
* ``tree``  a ``ROOT/DICOMDIR`` (CD/DVD export, read with pydicom's FileSet), or DICOM files deeper
  than ``ROOT/<folder>/`` (``ROOT/<patient>/<study>/<series>/*.dcm``): slices grouped into series by
  SeriesInstanceUID and series into patients by PatientID, whatever the folders. Series whose
  folder name or SeriesDescription says quarter / low dose or full dose are paired per patient
  by slice position; without such marks every series is unpaired (as ``dicom``).

Every DICOM layout reads multi-frame (Enhanced CT) files frame by frame (``ctio.frame_path``) and
skips, with a ``note:`` line, what is not an axial CT slice (files that are not DICOM, secondary
captures, localizers, ...) and second copies of one SOP Instance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from ctio import (
    CTDataError,
    NotASliceError,
    dicom_frames,
    not_an_axial_slice,
    pixel_spacing,
    read_slice,
    slice_position,
    slice_shape,
)

LAYOUTS = ("mayo", "npy", "tif", "dicom", "tree")
# Files that may sit beside DICOM slices in hospital exports and are not slices.
_NOT_SLICES = {".txt", ".md", ".json", ".csv", ".xml", ".pdf", ".jpg", ".jpeg", ".png", ".zip",
               ".log", ".ini", ".html", ".py"}
_POSITION_TOL_MM = 0.01  # QD and FD slices of one position agree to well below this
_SPACING_TOL_MM = 1e-3  # QD and FD pixel spacings of one position agree to well below this
# Dose marks of a series folder name or SeriesDescription in a "tree" (quarter_3mm / full_3mm as in
# the Mayo layout, "Low Dose Images" / "Full Dose Images" as in TCIA's LDCT-and-Projection-data).
_QD_MARK = re.compile(r"(?:^|[^a-z])(?:quarter|low[ _-]?dose)(?:[^a-z]|$)")
_FD_MARK = re.compile(r"(?:^|[^a-z])full(?:[ _-]?dose|_)")
# PatientIDs that anonymisation writes for every patient alike: not an identity.
_PLACEHOLDER_IDS = {"anonymous", "anonymized", "anonymised", "anon", "unknown", "none", "na",
                    "n_a", "removed", "deidentified", "patient", "0"}
_NPY_NAME = re.compile(r"^(?P<patient>.+)_(?P<idx>\d+)_(?P<kind>input|target)\.npy$")


# --- Finding and pairing datasets ---------------------------------------------------------------
@dataclass
class SliceRecord:
    """One slice position: its identity and source files (either side may be missing)."""

    patient: str
    slice_id: str
    position: float
    ld_path: Optional[str]
    fd_path: Optional[str]
    shape: tuple[int, int]


@dataclass
class CTDataset:
    """The slices found under ``root``, sorted by patient and position."""

    layout: str
    root: str
    records: list[SliceRecord] = field(default_factory=list)

    @property
    def patients(self) -> list[str]:
        return sorted({r.patient for r in self.records})

    @property
    def paired(self) -> bool:
        return bool(self.records) and all(r.ld_path and r.fd_path for r in self.records)

    @property
    def has_ld(self) -> bool:
        return bool(self.records) and all(r.ld_path for r in self.records)

    def for_patients(self, patients) -> CTDataset:
        keep = set(patients)
        return CTDataset(self.layout, self.root, [r for r in self.records if r.patient in keep])

    def select(self, include=None, exclude=None) -> CTDataset:
        """Keep the slices matching ``include`` and not ``exclude``.

        Each spec is ``PATIENT`` (all its slices) or ``PATIENT:SLICE`` (one slice id, as shown in
        the manifest, e.g. ``L506:160``). A spec matching nothing is a CTDataError (typo guard).
        """
        def matcher(specs):
            hits = {s: 0 for s in specs}

            def match(r):
                found = False
                for s in specs:
                    patient, _, sid = s.partition(":")
                    if r.patient == patient and (not sid or r.slice_id == sid):
                        hits[s] += 1
                        found = True
                return found
            return match, hits

        records = self.records
        for specs, keep in ((include, True), (exclude, False)):
            if specs:
                match, hits = matcher(list(specs))
                records = [r for r in records if match(r) == keep]
                unused = [s for s, n in hits.items() if n == 0]
                if unused:
                    raise CTDataError(f"{self.root}: no slice matches {unused[0]} "
                                      "(use PATIENT or PATIENT:SLICE)")
        return CTDataset(self.layout, self.root, records)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _slice_files(folder: Path) -> list[Path]:
    """Candidate slice files in one folder (hidden files, DICOMDIR and documents skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and _visible(p) and p.name.upper() != "DICOMDIR"
                  and p.suffix.lower() not in _NOT_SLICES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def _dose_dirs(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """{suffix: dir} for ``quarter_<suffix>`` and ``full_<suffix>`` sub-folders."""
    qd, fd = {}, {}
    for d in _subdirs(folder):
        name = d.name.lower()
        if name.startswith("quarter_"):
            qd[d.name[len("quarter_"):]] = d
        elif name.startswith("full_"):
            fd[d.name[len("full_"):]] = d
    return qd, fd


class _DicomSlice(NamedTuple):
    """Header facts of one DICOM slice that discovery and pairing need (no pixels decoded)."""

    position: float
    path: Path  # the file, or a ctio.frame_path of one frame of a multi-frame file
    shape: tuple[int, int]
    spacing: Optional[tuple[float, float]]  # PixelSpacing (row, column) in mm, if present
    series: str = ""  # SeriesInstanceUID
    sop: str = ""  # SOPInstanceUID (and frame number)
    patient_id: str = ""
    description: str = ""  # SeriesDescription
    series_number: Optional[int] = None


def _slice_of(path: str, ds) -> _DicomSlice:
    """The header facts of one slice (``ds`` is its header, or its frame's)."""
    def text(keyword):
        return str(ds.get(keyword, "") or "").strip()

    frame = getattr(ds, "source_frame", None)
    try:
        number = int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = None
    return _DicomSlice(slice_position(ds), Path(path), (int(ds.Rows), int(ds.Columns)),
                       pixel_spacing(ds), text("SeriesInstanceUID"),
                       text("SOPInstanceUID") + (f"#{frame}" if frame else ""),
                       text("PatientID"), text("SeriesDescription"), number)


def _read_slices(files) -> list[_DicomSlice]:
    """The axial CT slices (every frame of a multi-frame file) of DICOM ``files``, headers only.

    What is not a CT image slice (not DICOM, not an image, a colour or secondary-capture picture
    such as a dose report), localizers and non-axial images are skipped with one ``note:`` line
    per folder and kind, and so are second copies of one SOP Instance. A folder whose files are
    all not DICOM is an error naming the first."""
    items, junk, other = [], [], []
    for f in files:
        try:
            frames = dicom_frames(f)
        except NotASliceError as e:
            junk.append((Path(f), e))
            continue
        for path, ds in frames:
            why = not_an_axial_slice(ds)
            if why:
                other.append((Path(path), why))
            else:
                items.append(_slice_of(path, ds))
    if junk and not items and not other:
        raise CTDataError(f"{junk[0][1]}; no CT slices in {junk[0][0].parent}")
    for skipped, what in ((junk, "file(s) that are not CT image slices"),
                          (other, "image(s) that are not axial slices")):
        for folder in sorted({f.parent for f, _ in skipped}):
            here = [(f, why) for f, why in skipped if f.parent == folder]
            why = str(here[0][1]).split(": ", 1)[-1] if isinstance(here[0][1], Exception) \
                else here[0][1]
            print(f"note: skipped {len(here)} {what} in {folder} (first: {here[0][0].name}, "
                  f"{why})")
    return _drop_duplicates(items)


def _drop_duplicates(items: list[_DicomSlice]) -> list[_DicomSlice]:
    """``items`` without second copies of one SOP Instance (one note per folder)."""
    first: dict[str, Path] = {}
    kept, dups = [], []
    for t in items:
        if t.sop and t.sop in first:
            dups.append((t.path, first[t.sop]))
        else:
            first.setdefault(t.sop, t.path)
            kept.append(t)
    for folder in sorted({f.parent for f, _ in dups}):
        here = [(f, g) for f, g in dups if f.parent == folder]
        print(f"note: skipped {len(here)} duplicate(s) of SOP Instances already read in {folder} "
              f"(first: {here[0][0].name}, the same SOP Instance UID as {here[0][1]})")
    return kept


def _check_series(items: list[_DicomSlice], where) -> list[_DicomSlice]:
    """``items`` sorted by position; two slices at one position or two sizes are an error."""
    items = sorted(items, key=lambda t: t.position)
    for a, b in zip(items, items[1:]):
        if abs(a.position - b.position) < _POSITION_TOL_MM:
            raise CTDataError(f"{b.path}: same slice position {b.position:g} as {a.path} "
                              "(two series mixed in one folder?)")
    _check_one_size([(t.path, t.shape) for t in items], where)
    return items


def _dicom_series(folder: Path) -> list[_DicomSlice]:
    """Every axial DICOM slice in ``folder``, sorted by position (:func:`_read_slices` skips what
    is not one, with notes). Several series in one folder are read as one, with a note."""
    items = _read_slices(_slice_files(folder))
    series = sorted({t.series for t in items if t.series})
    if len(series) > 1:
        print(f"note: {folder} holds {len(series)} series (SeriesInstanceUID {series[0]}, "
              f"{series[1]}{', ...' if len(series) > 2 else ''}): read as one; give each series "
              "its own folder to keep them apart")
    return _check_series(items, folder)


def _check_one_size(files_shapes, where) -> None:
    if not files_shapes:
        return
    f0, s0 = files_shapes[0]
    for f, s in files_shapes[1:]:
        if s != s0:
            raise CTDataError(f"{where}: mixed slice sizes: {f0} is {s0[0]}x{s0[1]} but "
                              f"{f} is {s[0]}x{s[1]}")


def _check_same_grid(q: _DicomSlice, f: _DicomSlice) -> None:
    """QD and FD of one position must share the table position, size and pixel spacing."""
    if abs(q.position - f.position) > _POSITION_TOL_MM:
        raise CTDataError(f"slice position mismatch: {q.path} at {q.position:g} mm vs {f.path} "
                          f"at {f.position:g} mm")
    if q.shape != f.shape:
        raise CTDataError(f"size mismatch: {q.path} is {q.shape[0]}x{q.shape[1]} but {f.path} "
                          f"is {f.shape[0]}x{f.shape[1]}")
    if (q.spacing is None) != (f.spacing is None) or (
            q.spacing and not np.allclose(q.spacing, f.spacing, rtol=0, atol=_SPACING_TOL_MM)):
        def mm(s):
            return "no PixelSpacing" if s is None else f"{s[0]:g}x{s[1]:g} mm pixels"
        raise CTDataError(f"pixel spacing mismatch: {q.path} has {mm(q.spacing)} but {f.path} "
                          f"has {mm(f.spacing)} (another field of view)")


def _pair_by_position(patient: str, qd_dir: Optional[Path], fd_dir: Optional[Path],
                      prefix: str = "") -> list[SliceRecord]:
    return _pair_items(patient, _dicom_series(qd_dir) if qd_dir else None,
                       _dicom_series(fd_dir) if fd_dir else None, prefix, qd_dir, fd_dir)


def _pair_items(patient: str, qd: Optional[list[_DicomSlice]], fd: Optional[list[_DicomSlice]],
                prefix: str, qd_dir, fd_dir) -> list[SliceRecord]:
    """Records of one QD series and/or one FD series (sorted by position; either may be None),
    paired by position; ``qd_dir`` / ``fd_dir`` name them in errors."""
    if qd is not None and fd is not None:
        if not qd or not fd:
            empty = qd_dir if not qd else fd_dir
            raise CTDataError(f"{empty}: no DICOM slices, but its counterpart has some")
        if len(qd) != len(fd):
            qpos = {round(t.position, 2) for t in qd}
            fpos = {round(t.position, 2) for t in fd}
            odd = ([t.path for t in qd if round(t.position, 2) not in fpos]
                   + [t.path for t in fd if round(t.position, 2) not in qpos])
            first = f"; first unmatched: {odd[0]}" if odd else ""
            raise CTDataError(f"{qd_dir} has {len(qd)} slices but {fd_dir} has {len(fd)}{first}")
        for q, f in zip(qd, fd):
            _check_same_grid(q, f)
        return [SliceRecord(patient, f"{prefix}{i:04d}", q.position, str(q.path), str(f.path),
                            q.shape) for i, (q, f) in enumerate(zip(qd, fd))]
    side = qd or fd
    return [SliceRecord(patient, f"{prefix}{i:04d}", t.position, str(t.path) if qd else None,
                        str(t.path) if fd else None, t.shape) for i, t in enumerate(side)]


def _discover_mayo(root: Path) -> list[SliceRecord]:
    qd, fd = _dose_dirs(root)
    patient_dirs = [(root.name, root)] if (qd or fd) else [(d.name, d) for d in _subdirs(root)]
    records = []
    for patient, pdir in patient_dirs:
        qd, fd = _dose_dirs(pdir)
        if not qd and not fd:
            continue
        if qd and fd and set(qd) != set(fd):
            raise CTDataError(f"{pdir}: quarter_* folders {sorted(qd)} do not match full_* "
                              f"folders {sorted(fd)}")
        suffixes = sorted(set(qd) | set(fd))
        for suffix in suffixes:
            prefix = f"{suffix}_" if len(suffixes) > 1 else ""
            records += _pair_by_position(patient, qd.get(suffix), fd.get(suffix), prefix)
    return records


def _discover_npy(root: Path) -> list[SliceRecord]:
    found: dict[tuple[str, int], dict[str, Path]] = {}
    for f in _slice_files(root):
        m = _NPY_NAME.match(f.name)
        if m:
            found.setdefault((m["patient"], int(m["idx"])), {})[m["kind"]] = f
    any_target = any("target" in v for v in found.values())
    any_input = any("input" in v for v in found.values())
    records = []
    for (patient, idx), files in sorted(found.items()):
        if any_target and any_input and len(files) != 2:
            have = next(iter(files.values()))
            missing = "target" if "input" in files else "input"
            raise CTDataError(f"{have}: no matching _{missing}.npy file")
        ld, fd = files.get("input"), files.get("target")
        shapes = [(f, slice_shape(f)) for f in (ld, fd) if f]
        _check_one_size(shapes, f"{patient} slice {idx}")
        records.append(SliceRecord(patient, str(idx), float(idx), ld and str(ld),
                                   fd and str(fd), shapes[0][1]))
    return records


def _discover_tif(root: Path) -> list[SliceRecord]:
    noisy, clean = root / "noisy", root / "clean"
    ld = {f.name: f for f in _slice_files(noisy)} if noisy.is_dir() else {}
    fd = {f.name: f for f in _slice_files(clean)} if clean.is_dir() else {}
    if ld and fd and set(ld) != set(fd):
        odd = sorted(set(ld) ^ set(fd))[0]
        where = noisy / odd if odd in ld else clean / odd
        raise CTDataError(f"{where}: no file of the same name in "
                          f"{clean if odd in ld else noisy}")
    records = []
    for i, name in enumerate(sorted(ld or fd)):
        stem = Path(name).stem
        patient = stem.split("_")[0] if "_" in stem else root.name
        files = [f for f in (ld.get(name), fd.get(name)) if f]
        shapes = [(f, slice_shape(f)) for f in files]
        _check_one_size(shapes, name)
        records.append(SliceRecord(patient, stem, float(i), ld.get(name) and str(ld[name]),
                                   fd.get(name) and str(fd[name]), shapes[0][1]))
    return records


def _discover_dicom(root: Path, role: str) -> list[SliceRecord]:
    folders = [root] if _slice_files(root) else _subdirs(root)
    records = []
    for folder in folders:
        for i, t in enumerate(_dicom_series(folder)):
            ld, fd = (str(t.path), None) if role == "ld" else (None, str(t.path))
            records.append(SliceRecord(folder.name, f"{i:04d}", t.position, ld, fd, t.shape))
    return records


def _tree_files(root: Path) -> list[Path]:
    """The files of a DICOMDIR's IMAGE records, else every candidate slice file under ``root``
    at any depth (hidden files and folders, DICOMDIRs and documents left out)."""
    dicomdir = root / "DICOMDIR"
    if dicomdir.is_file():
        from pydicom.fileset import FileSet

        try:
            files = [Path(i.path) for i in FileSet(dicomdir) if i.node.record_type == "IMAGE"]
        except Exception as e:  # pydicom raises many types for a damaged DICOMDIR
            print(f"note: {dicomdir}: unreadable DICOMDIR ({type(e).__name__}); searching the "
                  "folders instead")
        else:
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise CTDataError(f"{missing[0]}: listed in {dicomdir} but missing")
            return sorted(files)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.upper() != "DICOMDIR"
                  and not any(s.startswith(".") for s in p.relative_to(root).parts)
                  and p.suffix.lower() not in _NOT_SLICES)


def dose_mark(text: str) -> Optional[str]:
    """``"ld"`` for a quarter / low-dose name, ``"fd"`` for a full-dose one, else None."""
    text = text.lower()
    qd, fd = bool(_QD_MARK.search(text)), bool(_FD_MARK.search(text))
    return "ld" if qd and not fd else "fd" if fd and not qd else None


def _patient_name(t: _DicomSlice, root: Path) -> str:
    """A tree's patient: PatientID (made safe as a folder name), else, when it is empty or an
    anonymisation placeholder (:data:`_PLACEHOLDER_IDS`: the Mayo challenge files all say
    "Anonymous"), the first folder under ``root`` that holds the slice (``root``'s own name for
    slices directly in it)."""
    pid = re.sub(r"[^A-Za-z0-9._-]+", "_", t.patient_id).strip("._")
    if pid and pid.lower() not in _PLACEHOLDER_IDS:
        return pid
    parts = t.path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else root.name


def _match_series(qd: list, fd: list) -> list[tuple[Optional[list], Optional[list]]]:
    """Pair one patient's QD and FD series (lists of slices sorted by position) by their slice
    positions: one of each is one pair (its mismatches are reported slice by slice); otherwise
    each QD series needs exactly one FD series with the same positions; FD series left over are
    skipped with a note. A patient without QD series is full dose only (for simulation)."""
    if not fd or not qd or (len(qd) == 1 and len(fd) == 1):
        return [(q, fd[0] if fd else None) for q in qd] if qd else [(None, f) for f in fd]

    def grid(s):
        return [round(t.position, 2) for t in s]

    pairs, used = [], set()
    for q in qd:
        same = [i for i, f in enumerate(fd) if grid(f) == grid(q) and i not in used]
        if len(same) != 1:
            raise CTDataError(f"{q[0].path.parent}: {'several' if same else 'no'} full-dose "
                              f"series with the same {len(q)} slice positions (series "
                              f"{q[0].series_number}, {q[0].description or 'no description'})")
        used.add(same[0])
        pairs.append((q, fd[same[0]]))
    for f in (f for i, f in enumerate(fd) if i not in used):
        print(f"note: skipped full-dose series {f[0].series_number} in {f[0].path.parent}: no "
              "quarter / low-dose series has its slice positions")
    return pairs


def _unit_labels(units) -> list[str]:
    """Slice-id prefixes of a patient's series (or pairs): the ``quarter_`` / ``full_`` folder
    suffix, else ``s<SeriesNumber>``, else the unit's number, whichever is unique."""
    def label(unit, k):
        t = (unit[0] or unit[1])[0]
        m = re.match(r"(?i)^(?:quarter|full)_(.+)$", t.path.parent.name)
        return m[1] if m else f"s{t.series_number}" if t.series_number is not None else str(k)

    labels = [label(u, k + 1) for k, u in enumerate(units)]
    return labels if len(set(labels)) == len(labels) else [str(k + 1) for k in range(len(units))]


def _discover_tree(root: Path, role: str) -> list[SliceRecord]:
    """DICOMDIR or nested folders: slices grouped into series by SeriesInstanceUID, series into
    patients by PatientID. When any series is marked quarter / low dose or full dose (folder
    name or SeriesDescription, :func:`dose_mark`), QD and FD series of a patient are paired and
    unmarked ones skipped with a note; otherwise every series is ``role``."""
    series: dict[str, list[_DicomSlice]] = {}
    for t in _read_slices(_tree_files(root)):
        series.setdefault(t.series or f"folder:{t.path.parent}", []).append(t)
    series = {uid: _check_series(s, f"{s[0].path.parent} (series {s[0].series_number})")
              for uid, s in series.items()}
    marks = {uid: dose_mark(s[0].path.parent.name) or dose_mark(s[0].description)
             for uid, s in series.items()}
    paired = any(marks.values())
    patients: dict[str, list[str]] = {}
    for uid, s in series.items():
        patients.setdefault(_patient_name(s[0], root), []).append(uid)
    records = []
    for patient, uids in sorted(patients.items()):
        uids.sort(key=lambda u: (series[u][0].series_number or 0, str(series[u][0].path)))
        if paired:
            for u in (u for u in uids if marks[u] is None):
                print(f"note: skipped series {series[u][0].series_number} in "
                      f"{series[u][0].path.parent}: neither quarter / low dose nor full dose "
                      "(by folder name or SeriesDescription)")
            units = _match_series([series[u] for u in uids if marks[u] == "ld"],
                                  [series[u] for u in uids if marks[u] == "fd"])
        else:
            units = [(series[u], None) if role == "ld" else (None, series[u]) for u in uids]
        labels = _unit_labels(units)
        for (q, f), label in zip(units, labels):
            records += _pair_items(patient, q, f, f"{label}_" if len(units) > 1 else "",
                                   q and q[0].path.parent, f and f[0].path.parent)
    return records


def detect_layout(root: Path) -> Optional[str]:
    """Guess the layout of ``root`` from folder and file names (no file is read): ``tree`` for a
    DICOMDIR, or for slice files only deeper than ``ROOT/<folder>/``."""
    files = _slice_files(root)
    if any(_NPY_NAME.match(f.name) for f in files):
        return "npy"
    subs = _subdirs(root)
    names = {d.name for d in subs}
    if names & {"noisy", "clean"}:
        return "tif"
    if (root / "DICOMDIR").is_file():
        return "tree"
    qd, fd = _dose_dirs(root)
    if qd or fd or any(any(_dose_dirs(d)) for d in subs):
        return "mayo"
    if files or any(_slice_files(d) for d in subs):
        return "dicom"
    if any(_slice_files(p) for d in subs for p in d.rglob("*") if p.is_dir() and _visible(p)):
        return "tree"
    return None


def discover(root, layout: Optional[str] = None, single_role: str = "ld") -> CTDataset:
    """Find the slices under ``root`` and pair low dose with full dose.

    Args:
        root: dataset folder (see the module docstring for the layouts).
        layout: one of ``LAYOUTS`` to override auto-detection, or None.
        single_role: for the unpaired ``dicom`` and ``tree`` layouts, whether its slices are
            the low-dose input (``"ld"``, inference) or the full dose (``"fd"``, simulation /
            training).

    Raises CTDataError for a missing or empty folder, an unknown layout, unpaired or mismatched
    slices (naming the first offending files), unreadable headers, or mixed slice sizes.
    """
    root = Path(root)
    if layout is not None and layout not in LAYOUTS:
        raise CTDataError(f"unknown layout '{layout}' (choose from: {', '.join(LAYOUTS)})")
    if not root.exists():
        raise CTDataError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise CTDataError(f"{root}: not a folder (give the dataset folder)")
    try:
        if not any(root.iterdir()):
            raise CTDataError(f"{root}: empty folder")
        layout = layout or detect_layout(root)
        if layout is None:
            raise CTDataError(f"{root}: no CT slices found (expected a Mayo tree, *_input.npy/"
                              "*_target.npy, noisy/ + clean/ TIFFs, or DICOM files)")
        finder = {"mayo": _discover_mayo, "npy": _discover_npy, "tif": _discover_tif,
                  "dicom": lambda r: _discover_dicom(r, single_role),
                  "tree": lambda r: _discover_tree(r, single_role)}[layout]
        records = finder(root)
    except PermissionError as e:
        raise CTDataError(f"{e.filename}: permission denied") from None
    if not records:
        raise CTDataError(f"{root}: no CT slices found for layout '{layout}'")
    return CTDataset(layout, str(root), records)


# --- Dataset summaries (the loaders' check-my-data commands) -----------------------------------
def summarize(dataset: CTDataset) -> dict:
    """Layout, patients, counts, sizes and HU range of each side.

    Reads every slice, one at a time, so a corrupt file, NaN/inf or a pair of different sizes
    raises CTDataError here rather than during training.
    """
    lo = {"ld": np.inf, "fd": np.inf}
    hi = {"ld": -np.inf, "fd": -np.inf}
    for r in dataset.records:
        shapes = []
        for side, path in (("ld", r.ld_path), ("fd", r.fd_path)):
            if path:
                img = read_slice(path)[0]
                shapes.append((path, img.shape))
                lo[side] = min(lo[side], float(img.min()))
                hi[side] = max(hi[side], float(img.max()))
        _check_one_size(shapes, f"{r.patient} slice {r.slice_id}")
    return {
        "layout": dataset.layout,
        "patients": {p: sum(r.patient == p for r in dataset.records) for p in dataset.patients},
        "slices": len(dataset.records),
        "pairs": sum(bool(r.ld_path and r.fd_path) for r in dataset.records),
        "sizes": sorted({f"{r.shape[0]}x{r.shape[1]}" for r in dataset.records}),
        "hu_range": {k: (lo[k], hi[k]) for k in lo if np.isfinite(lo[k])},
    }


def print_summary(info: dict, data) -> None:
    """Print :func:`summarize`'s result for a person."""
    pats = ", ".join(f"{p} ({n})" for p, n in info["patients"].items())
    print(f"data:      {data}")
    print(f"layout:    {info['layout']}")
    print(f"patients:  {len(info['patients'])}: {pats}")
    print(f"slices:    {info['slices']}  (QD/FD pairs: {info['pairs']})")
    print(f"size:      {', '.join(info['sizes'])}")
    for side, name in (("ld", "LD (input)"), ("fd", "FD (reference)")):
        if side in info["hu_range"]:
            lo, hi = info["hu_range"][side]
            print(f"HU {name}: [{lo:.0f}, {hi:.0f}]")
