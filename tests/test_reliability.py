"""Reliability: every bad input ends cleanly, nothing is lost, interrupted runs recover.

Drives the real command-line tools as users run them (``sys.executable SCRIPT ...`` with the
repository as working directory) against a catalogue of bad inputs. Every failure must

* exit non-zero with exactly one line on stderr that names the problem and the file or flag,
  without a traceback or TensorFlow internals;
* leave no half-written output: no ``.*tmp*`` temporaries, every file in the output folder
  readable, no run folder that can be neither resumed nor reused, no incomplete simulated
  dataset that looks complete;
* leave every input byte-for-byte unchanged (sha256 of every file before and after).

Positive cases: a data folder, run folder and output folder with spaces and non-ASCII characters
and a dataset of ONE slice go through train -> test -> evaluation; ``kill -9`` of training and of
inference loses nothing and the rerun recovers. The training kill runs on that one-slice,
non-ASCII dataset, so the module trains twice only (the killed run and its --resume).

Cost: cases that fail before TensorFlow is imported take ~1 s per process and run several CLIs at
once. The TensorFlow cases are marked slow; their failures run three at a time in the background
(``tf_jobs``), which matters on a shared 2-core machine.
"""

import contextlib
import csv
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import ENV, REPO, cli, history_epochs, make_run, write_mayo_tree

import ctdata
import ctio
import ctrun

SCRIPTS = ("MyDataLoader_train.py", "MyDataLoader_test.py", "Mytrain.py", "Mytest.py",
           "Mysimulate.py", "Myevaluation.py")
TF_SCRIPTS = ("Mytrain.py",)  # imports TensorFlow before reading pixels (Mytest.py decodes
#                               every slice first, before TensorFlow and before creating OUT)
TINY = ["--preset", "small", "--patch", "32", "--batch", "4", "--steps-per-epoch", "2",
        "--val-slices", "1", "--verbose", "2"]
BASE, DEPTH = 8, 3  # the untrained generator of the inference run folder
TMP_NAME = re.compile(r"^\..*\.tmp")  # ctio.atomic_path temporaries: .<name>.tmp<pid>.<ext>
TF_INTERNALS = ("{{node", "[Op:", "Traceback")
PARALLEL = 3  # processes at a time; the machine has 2 cores shared with others


# --- Running the CLIs ---------------------------------------------------------------------------
def cli_parallel(commands: dict) -> dict:
    """{key: (script, args)} -> {key: CompletedProcess}, PARALLEL processes at a time."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {k: pool.submit(cli, script, *args) for k, (script, args) in commands.items()}
        return {k: f.result() for k, f in futures.items()}


def popen(script: str, *args, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # a file, not a pipe: nobody reads while it runs
        return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)],
                                stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=ENV)


def _has(text: str, needle) -> bool:
    return bool(needle.search(text)) if isinstance(needle, re.Pattern) else str(needle) in text


def failure_problems(proc, needles) -> list[str]:
    """What is wrong with ``proc`` as a clean failure naming ``needles`` ([] if nothing)."""
    lines = proc.stderr.strip().splitlines()
    problems = []
    if proc.returncode == 0:
        problems.append("exit code 0 (expected a failure)")
    if len(lines) != 1:
        problems.append(f"{len(lines)} stderr lines (expected exactly one)")
    problems += [f"stderr shows {t!r}" for t in TF_INTERNALS if t in proc.stderr]
    line = lines[-1] if lines else ""
    problems += [f"message lacks {n.pattern if isinstance(n, re.Pattern) else n!r}"
                 for n in needles if not _has(line, n)]
    if problems:
        problems.append(f"stderr was: {proc.stderr.strip()[-1500:]!r}")
    return problems


# --- Inputs unchanged, outputs sound ------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digest(*roots) -> dict:
    """{path: sha256 | 'dir' | None} of every file and folder under ``roots``."""
    out = {}
    for root in map(Path, roots):
        if not root.exists():
            out[str(root)] = None
            continue
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            out[str(p)] = _sha256(p) if p.is_file() else "dir"
    return out


def changed(before: dict, after: dict) -> list[str]:
    """Paths added, removed or modified between two digests."""
    return [f"input changed: {k}" for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k)]


@contextlib.contextmanager
def unchanged(*inputs):
    """Assert that no file or folder under ``inputs`` is added, removed or modified."""
    before = digest(*inputs)
    yield
    problems = changed(before, digest(*inputs))
    assert not problems, "\n".join(problems[:5])


def unreadable(path: Path):
    """None if ``path`` is a complete file of its type, else why not."""
    import cv2
    import h5py

    try:
        suffix = path.suffix
        if suffix == ".h5":
            with h5py.File(path, "r") as f:
                f.visit(lambda _: None)
        elif suffix == ".npy":
            np.load(path, allow_pickle=False)
        elif suffix == ".png":
            if cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is None:
                return "cv2 cannot read it"
        elif suffix in (".tif", ".tiff", ".dcm"):
            ctio.read_slice(path)
        elif suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".csv":
            with open(path, newline="") as f:
                list(csv.DictReader(f))
    except Exception as e:  # noqa: BLE001 - any failure to read is the finding
        return f"{type(e).__name__}: {e}"
    return None


def output_problems(folder: Path, script: str = "") -> list[str]:
    """Half-written or stranded outputs in ``folder`` (absent is fine)."""
    folder = Path(folder)
    if not folder.exists():
        return []
    problems = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if TMP_NAME.match(p.name):
            problems.append(f"temporary file left: {p}")
        elif (why := unreadable(p)) is not None:
            problems.append(f"unreadable output {p}: {why}")
    if script == "Mytrain.py" and (folder / "config.json").is_file() \
            and not (folder / "state" / "state.json").is_file():
        problems.append(f"{folder} holds config.json but no state/state.json: the same command "
                        "now says 'already holds a run' and --resume says 'no training state'")
    if script == "Mysimulate.py" and any(p.is_file() for p in folder.rglob("*")):
        n = sum(p.is_file() for p in folder.rglob("*"))
        problems.append(f"failed simulation left {n} files in {folder}: an incomplete dataset "
                        "that looks complete (and blocks the rerun without --overwrite)")
    if script == "Mytest.py" and folder.is_dir() and not any(folder.iterdir()):
        problems.append(f"failed run left an empty {folder}")
    if script == "Mytest.py" and (folder / "manifest.csv").is_file():
        for row in manifest_rows(folder):
            for col in ("pred_npy", "png", "tiff", "dicom", "figure"):
                if row.get(col) and not (folder / row[col]).is_file():
                    problems.append(f"manifest lists missing {row[col]}")
    return problems


def manifest_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- Run folders --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def latest_run(tmp_path_factory) -> Path:
    """Inference run folder (untrained generator, base 8, depth 3) with generator_latest only
    (a run stopped before its first validation: Mytest.py falls back to it)."""
    return make_run(tmp_path_factory.mktemp("runs") / "tiny", weights="latest")


def fake_prediction(pred: Path, data: Path) -> Path:
    """A Mytest.py output folder for ``data`` (predictions = zeros) to evaluate against it."""
    try:
        records = ctdata.discover(data, single_role="fd").records
    except ctio.CTDataError:  # Myevaluation will meet the same error in --data
        records = [ctdata.SliceRecord("P01", "0000", 0.0, None, None, (64, 64))]
    pred.mkdir(parents=True)
    rows = []
    for r in records:
        (pred / r.patient).mkdir(exist_ok=True)
        np.save(pred / r.patient / f"{r.slice_id}.npy", np.zeros(r.shape, np.float32))
        rows.append({"patient": r.patient, "slice_id": r.slice_id, "position": repr(r.position),
                     "ld_path": r.ld_path or "", "fd_path": "",
                     "pred_npy": f"{r.patient}/{r.slice_id}.npy"})
    write_csv(pred / "manifest.csv", rows)
    return pred


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


# --- The bad-data catalogue ---------------------------------------------------------------------
# Each builder writes a dataset under ROOT and returns (data folder, what the message must name).
# Damage is done to the full-dose side (the side every tool reads, the simulator included) and
# never to the first slice, so tools that stream slices meet it mid-run.
def _mayo(root: Path) -> Path:
    return write_mayo_tree(root / "data", patients=("P01", "P02"), slices=2, size=64)


def _edit_dicom(path: Path, **changes) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(path)


def _npy(root: Path, n: int = 3) -> Path:
    d = root / "data"
    d.mkdir()
    yy, xx = np.mgrid[:64, :64]
    for i in range(n):
        fd = np.where(np.hypot(yy - 32, xx - 32) < 26, 40.0, -1000.0)
        np.save(d / f"P1_{i}_target.npy", (fd + 1024) / 4096)
        np.save(d / f"P1_{i}_input.npy", (fd + 5 + 1024) / 4096)
    return d


def case_missing(root):
    d = root / "no such data"
    return d, (str(d), "no such file")


def case_empty(root):
    (d := root / "data").mkdir()
    return d, (str(d), "empty folder")


def case_documents(root):
    (d := root / "data").mkdir()
    for name in ("notes.txt", "slice list.csv", "photo.jpg", "report.pdf"):
        (d / name).write_bytes(os.urandom(64))
    return d, (str(d), "no CT slices found")


def case_garbage(root):
    (d := root / "data").mkdir()
    for name in ("IM0001", "IM0002"):
        (d / name).write_bytes(b"not a DICOM file " + os.urandom(300))
    return d, (str(d / "IM0001"), "not a readable DICOM")


def case_mr(root):
    d = _mayo(root)
    f = d / "P02" / "full_3mm" / "0002.dcm"
    _edit_dicom(f, Modality="MR")
    return d, (str(f), "modality is MR")


def case_count_mismatch(root):
    d = _mayo(root)
    (d / "P01" / "quarter_3mm" / "0002.dcm").unlink()
    return d, ("has 1 slices", str(d / "P01" / "full_3mm" / "0002.dcm"))


def case_position_mismatch(root):
    d = _mayo(root)
    f = d / "P01" / "full_3mm" / "0002.dcm"  # z = 0 -> 1.5 mm
    import pydicom

    ipp = list(pydicom.dcmread(f).ImagePositionPatient)
    _edit_dicom(f, ImagePositionPatient=[*ipp[:2], 1.5], SliceLocation=1.5)
    return d, ("position mismatch", str(f))


def case_truncated_header(root):
    d = _mayo(root)
    f = d / "P02" / "full_3mm" / "0002.dcm"
    data = f.read_bytes()
    f.write_bytes(data[: data.index(b"\xe0\x7f\x10\x00") // 2])  # half of the header
    return d, (str(f), re.compile("truncat|corrupt"))


def case_truncated_pixels(root):
    d = _mayo(root)
    f = d / "P01" / "full_3mm" / "0002.dcm"  # a training slice: Mytrain.py reads it
    f.write_bytes(f.read_bytes()[:-300])
    return d, (str(f),)


def case_truncated_npy(root):
    d = _npy(root)
    f = d / "P1_1_target.npy"
    f.write_bytes(f.read_bytes()[:2000])
    return d, (str(f), ".npy")


def case_mixed_sizes(root):
    d = _mayo(root)
    for side in ("quarter_3mm", "full_3mm"):
        f = d / "P02" / side / "0002.dcm"
        hu, header = ctio.read_dicom(f)
        ctio.write_dicom(f, hu[8:56, 8:56], header, series_uid=header.SeriesInstanceUID,
                         description=side, derived=False)
    return d, ("mixed slice sizes", str(d / "P02"), "0002.dcm is 48x48")


def case_nan(root):
    d = _npy(root)
    f = d / "P1_2_target.npy"
    v = np.load(f)
    v[10, 20] = np.nan
    np.save(f, v)
    return d, (str(f), "NaN")


def case_inf(root):
    import tifffile

    d = root / "data"
    for sub in ("noisy", "clean"):
        (d / sub).mkdir(parents=True)
        for i in range(3):
            img = np.full((64, 64), 40.0 + 5 * (sub == "noisy"), np.float32)
            if sub == "clean" and i == 2:
                img[5, 5] = -np.inf
            tifffile.imwrite(d / sub / f"L067_{i:04d}.tif", img)
    return d, (str(d / "clean" / "L067_0002.tif"), "infinite")


def case_wrong_rank(root):
    d = _npy(root, 2)
    f = d / "P1_1_target.npy"
    np.save(f, np.zeros((2, 64, 64)))
    return d, (str(f), "2-D")


DATA_CASES = {
    "missing path": case_missing,
    "empty folder": case_empty,
    "non-image files": case_documents,
    "garbage files": case_garbage,
    "MR modality": case_mr,
    "QD/FD count mismatch": case_count_mismatch,
    "QD/FD position mismatch": case_position_mismatch,
    "truncated DICOM header": case_truncated_header,
    "truncated DICOM pixels": case_truncated_pixels,
    "truncated npy": case_truncated_npy,
    "mixed slice sizes": case_mixed_sizes,
    "NaN": case_nan,
    "inf": case_inf,
    "wrong rank": case_wrong_rank,
}
# Found by reading pixels, which Mytrain.py does after importing TensorFlow: it runs in the slow
# group (TF_CASES) for these cases, except inf (ctio._check_image treats it exactly like NaN).
# For Mytrain.py the truncated slice is a training slice (read by fit) and the NaN slice a
# validation slice (read first for the TensorBoard panels): two different paths.
READ_TIME = ("truncated DICOM pixels", "NaN", "inf")
READ_TIME_TF = ("truncated DICOM pixels", "NaN")


def data_commands(data: Path, tmp: Path, run: Path) -> dict:
    """{script: (args, output folder)} of every CLI on ``data``."""
    pred = tmp / "pred"
    if not pred.exists():
        fake_prediction(pred, data)
    return {
        "MyDataLoader_train.py": (["--data", data], None),
        "MyDataLoader_test.py": (["--data", data], None),
        "Mytrain.py": (["--data", data, "--out", tmp / "run", *TINY, "--epochs", "1"],
                       tmp / "run"),
        "Mytest.py": (["--data", data, "--run", run, "--out", tmp / "test", "--batch", "1"],
                      tmp / "test"),
        "Mysimulate.py": (["--input", data, "--out", tmp / "sim"], tmp / "sim"),
        "Myevaluation.py": (["--pred", pred, "--data", data], pred),
    }


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_every_cli_fails_cleanly(case, tmp_path, latest_run):
    data, needles = DATA_CASES[case](tmp_path)
    commands = data_commands(data, tmp_path, latest_run)
    if case in READ_TIME:
        commands = {s: c for s, c in commands.items() if s not in TF_SCRIPTS}
    with unchanged(data, latest_run, tmp_path / "pred"):
        procs = cli_parallel({s: (s, args) for s, (args, _) in commands.items()})
    problems = []
    for script, (_, out) in commands.items():
        found = failure_problems(procs[script], needles)
        found += output_problems(out, script) if out and script != "Myevaluation.py" else []
        problems += [f"{script}: {p}" for p in found]
    assert not problems, "\n".join(problems)


# --- Bad flags and folders ----------------------------------------------------------------------
@dataclass
class Case:
    """One CLI call expected to fail: what it must name, its inputs and its output folder."""

    script: str
    args: list
    needles: tuple
    inputs: list = field(default_factory=list)
    out: Path = None


def _args(script: str, t: Path, data: Path, run: Path) -> list:
    """Otherwise valid arguments of ``script`` on ``data``."""
    return {"MyDataLoader_train.py": ["--data", data], "MyDataLoader_test.py": ["--data", data],
            "Mytrain.py": ["--data", data, "--out", t / "r", *TINY, "--epochs", "1"],
            "Mytest.py": ["--data", data, "--run", run, "--out", t / "o"],
            "Mysimulate.py": ["--input", data, "--out", t / "s"],
            "Myevaluation.py": ["--pred", t / "p", "--data", data]}[script]


def _another_models_outputs(out: Path) -> Path:
    """OUT holding outputs of other weights (Mytest.py must not mix two models in one folder)."""

    out.mkdir()
    row = dict.fromkeys(ctrun.MANIFEST_FIELDS, "")
    row.update(patient="P01", slice_id="0000", pred_npy="P01/0000.npy",
               weights="/elsewhere/other.weights.h5", weights_sha256="0" * 64)
    write_csv(out / "manifest.csv", [row])
    return out


def _truncated_prediction(pred: Path, data: Path) -> Path:
    fake_prediction(pred, data)
    f = pred / "P01" / "0001.npy"
    f.write_bytes(f.read_bytes()[:100])
    return pred


def _blocker(t: Path) -> Path:
    (f := t / "a file").write_text("not a folder")
    return f


def _users_folder(t: Path) -> Path:
    """A folder of the user's own (no manifest) whose file has a Mytest.py output's name."""
    (f := t / "mine" / "P01" / "0000.png").parent.mkdir(parents=True)
    f.write_bytes(b"\x89PNG the user's own picture")
    return f.parent.parent


def _config_only(t: Path, run: Path) -> Path:
    (d := t / "run without weights").mkdir()
    shutil.copy(run / "config.json", d)
    return d


# {case: (t, good data, inference run) -> Case}; t is an empty folder of the case's own.
FLAG_CASES = {
    **{f"unknown layout: {s}": (lambda t, d, r, s=s: Case(
        s, [*_args(s, t, d, r), "--layout", "nifti"], ("--layout", "nifti"), [d, r], t / "o"))
       for s in SCRIPTS},
    "Mytrain --resume with nothing to resume": lambda t, d, r: Case(
        "Mytrain.py", ["--out", t / "empty run", "--resume"],
        ("--resume", str(t / "empty run"), "no training state"), [], t / "empty run"),
    "Mytrain --out holding another run": lambda t, d, r: Case(
        "Mytrain.py", ["--data", d, "--out", r, *TINY], (str(r), "already holds a run"), [d, r]),
    "Mytrain --epochs 0": lambda t, d, r: Case(
        "Mytrain.py", [*_args("Mytrain.py", t, d, r), "--epochs", "0"], ("--epochs",), [d],
        t / "r"),
    "Mytest missing --weights": lambda t, d, r: Case(
        "Mytest.py", [*_args("Mytest.py", t, d, r), "--weights", t / "nope.weights.h5"],
        (str(t / "nope.weights.h5"), "not found"), [d, r], t / "o"),
    "Mytest run folder without weights": lambda t, d, r: Case(
        "Mytest.py", ["--data", d, "--run", (c := _config_only(t, r)), "--out", t / "o"],
        (str(c), "generator_best.weights.h5"), [d, c], t / "o"),
    "Mytest --run that is no run folder": lambda t, d, r: Case(
        "Mytest.py", ["--data", d, "--run", d, "--out", t / "o"], (str(d), "config.json"), [d],
        t / "o"),
    "Mytest --out holding another model's outputs": lambda t, d, r: Case(
        "Mytest.py", ["--data", d, "--run", r, "--out", (o := _another_models_outputs(t / "o"))],
        (str(o), "made with other weights"), [d, r, o]),
    "Mytest --out under a regular file": lambda t, d, r: Case(
        "Mytest.py", ["--data", d, "--run", r, "--out", (b := _blocker(t)) / "out"], (str(b),),
        [d, r, b]),
    **{f"Mytest --out a folder it did not make{x}": (lambda t, d, r, x=x: Case(
        "Mytest.py", ["--data", d, "--run", r, "--out", (u := _users_folder(t)), *x.split()],
        (str(u / "P01" / "0000.png"), "not a Mytest.py output folder"), [d, r, u]))
       for x in ("", " --overwrite")},
    "Mytrain --out inside the input data": lambda t, d, r: Case(
        "Mytrain.py", ["--data", d, "--out", d / "run", *TINY], ("inside the input folder",),
        [d]),
    "Mytrain --cache-dir inside the input data": lambda t, d, r: Case(
        "Mytrain.py", [*_args("Mytrain.py", t, d, r), "--cache-dir", d / "P01" / "cache"],
        ("--cache-dir", "inside the input folder"), [d], t / "r"),
    "Mytrain --lambda-l1 inf": lambda t, d, r: Case(
        "Mytrain.py", [*_args("Mytrain.py", t, d, r), "--lambda-l1", "inf"],
        ("--lambda-l1 inf", "finite"), [d], t / "r"),
    "Mytrain --seed -1": lambda t, d, r: Case(
        "Mytrain.py", [*_args("Mytrain.py", t, d, r), "--seed=-1"], ("--seed -1",), [d], t / "r"),
    "MyDataLoader_train --exclude of every patient": lambda t, d, r: Case(
        "MyDataLoader_train.py", ["--data", d, "--exclude", "P01", "P02"],
        ("everything excluded",), [d]),
    "Mysimulate --out under a regular file": lambda t, d, r: Case(
        "Mysimulate.py", ["--input", d, "--out", (b := _blocker(t)) / "sim"], (str(b),), [d, b]),
    "Mysimulate --out holding another dataset": lambda t, d, r: Case(
        "Mysimulate.py", ["--input", d, "--out", r], (str(r), "not empty"), [d, r]),
    "Myevaluation --pred missing": lambda t, d, r: Case(
        "Myevaluation.py", ["--pred", t / "no pred"], (str(t / "no pred"), "no such folder"), [],
        t / "no pred"),
    "Myevaluation --pred without manifest": lambda t, d, r: Case(
        "Myevaluation.py", ["--pred", d], (str(d), "no manifest.csv"), [d]),
    "Myevaluation without references": lambda t, d, r: Case(
        "Myevaluation.py", ["--pred", (p := fake_prediction(t / "ld only", d))],
        (str(p / "manifest.csv"), "no slice has a full-dose reference"), [d, p]),
    "Myevaluation of a truncated prediction": lambda t, d, r: Case(
        "Myevaluation.py", ["--pred", (p := _truncated_prediction(t / "cut", d)), "--data", d],
        (str(p / "P01" / "0001.npy"), "unreadable prediction"), [d, p]),
}


@pytest.fixture(scope="module")
def flag_results(tmp_path_factory, latest_run) -> dict:
    """Every flag case run once, PARALLEL at a time: {case: problems}."""
    root = tmp_path_factory.mktemp("flags")
    data = write_mayo_tree(root / "good data", patients=("P01", "P02"), slices=2, size=64)
    cases = {}
    for i, (name, make) in enumerate(FLAG_CASES.items()):
        (t := root / f"case{i}").mkdir()
        cases[name] = make(t, data, latest_run)
    before = {name: digest(*c.inputs) for name, c in cases.items()}
    procs = cli_parallel({name: (c.script, c.args) for name, c in cases.items()})
    results = {}
    for name, c in cases.items():
        results[name] = (failure_problems(procs[name], c.needles)
                         + changed(before[name], digest(*c.inputs))
                         + (output_problems(c.out, c.script) if c.out else []))
    return results


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flags_and_folders_fail_cleanly(case, flag_results):
    assert not flag_results[case], "\n".join(flag_results[case])


# --- Failures found after TensorFlow is imported (slow; run PARALLEL at a time) -----------------
def _data_case(script: str, case: str):
    def make(root: Path, run: Path) -> Case:
        data, needles = DATA_CASES[case](root)
        args, out = data_commands(data, root, run)[script]
        return Case(script, args, needles, [data, run], out)
    return make


def _good(root: Path) -> Path:
    return write_mayo_tree(root / "data", patients=("P01", "P02"), slices=2, size=64)


def _train_flags(*flags, needles, out_name="run"):
    def make(root: Path, run: Path) -> Case:
        data, out = _good(root), root / out_name
        if out_name != "run":
            _blocker(root)
        return Case("Mytrain.py", ["--data", data, "--out", out, *TINY, "--epochs", "1", *flags],
                    needles(root), [data], None if out_name != "run" else out)
    return make


def _resume_truncated_state(root: Path, run: Path) -> Case:
    """A run folder whose state/gan_epoch0001.weights.h5 was cut short (disk full, copy...)."""
    import Mymodel
    import Mytrain

    data, out = _good(root), root / "run"
    (out / "state").mkdir(parents=True)
    args = Mytrain.parse_args(["--data", str(data), *TINY, "--epochs", "1"])
    train = {k: v for k, v in vars(args).items() if k not in ("resume", "verbose", "strategy",
                                                               "out")}
    cfg = {"version": 1,  # an older config.json: migrated on --resume
            "model": Mymodel.model_config("small"),
           "normalization": {"hu_min": ctio.HU_MIN, "hu_max": ctio.HU_MAX}, "train": train}
    (out / "config.json").write_text(json.dumps(cfg))
    good = (run / "generator_latest.weights.h5").read_bytes()
    cut = out / "state" / "gan_epoch0001.weights.h5"
    cut.write_bytes(good[: len(good) // 2])
    (out / "state" / "state.json").write_text(json.dumps(
        {"epoch": 1, "history": [{"epoch": 1}], "weights": cut.name}))
    return Case("Mytrain.py", ["--out", out, "--resume", "--epochs", "2", "--verbose", "2"],
                (str(cut), "cannot restore"), [data, out])


def _test_truncated_weights(root: Path, run: Path) -> Case:
    data, bad = _good(root), root / "cut.weights.h5"
    good = (run / "generator_latest.weights.h5").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    return Case("Mytest.py", ["--data", data, "--run", run, "--weights", bad, "--out",
                              root / "out"],
                (str(bad), "cannot load generator weights"), [data, run, bad], root / "out")


def _test_other_width(root: Path, run: Path) -> Case:
    """config.json says preset small; the weights have twice its filters and another depth."""
    import Mymodel

    data, small = _good(root), Mymodel.model_config("small")
    other = make_run(root / "run", base=2 * small["base_filters"],
                     depth=2 if small["depth"] != 2 else 3, model=small, weights="latest")
    return Case("Mytest.py", ["--data", data, "--run", other, "--out", root / "out"],
                (str(other / "generator_latest.weights.h5"), "cannot load generator weights",
                 f"base_filters={small['base_filters']}"), [data, other], root / "out")


TF_CASES = {
    **{f"{s[:-3]}: {c}": _data_case(s, c) for s in TF_SCRIPTS for c in READ_TIME_TF},
    "Mytrain --preset huge": _train_flags("--preset", "huge",
                                          needles=lambda r: ("--preset", "huge")),
    "Mytrain --patch not divisible by 2^depth": _train_flags(
        "--patch", "36", needles=lambda r: ("--patch 36", "2^depth")),
    "Mytrain --patch larger than the slices": _train_flags(
        "--patch", "128", needles=lambda r: ("--patch 128", "larger than the slice")),
    "Mytrain --out under a regular file": _train_flags(
        needles=lambda r: (str(r / "a file"),), out_name="a file/run"),
    "Mytrain --resume from a truncated state": _resume_truncated_state,
    "Mytest truncated weights": _test_truncated_weights,
    "Mytest weights of another width/depth than config.json": _test_other_width,
}


@pytest.fixture(scope="module")
def tf_jobs(request, tmp_path_factory, latest_run) -> dict:
    """Start every selected TF case at once (PARALLEL at a time): {case: (Case, digest, future)}."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_fails_cleanly_with_tensorflow"]
    pool = ThreadPoolExecutor(PARALLEL)
    jobs = {}
    for i, name in enumerate(wanted):
        case = TF_CASES[name](tmp_path_factory.mktemp(f"tf{i}"), latest_run)
        jobs[name] = (case, digest(*case.inputs), pool.submit(cli, case.script, *case.args))
    yield jobs
    pool.shutdown(cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TF_CASES))
def test_fails_cleanly_with_tensorflow(case, tf_jobs):
    c, before, future = tf_jobs[case]
    problems = (failure_problems(future.result(), c.needles)
                + changed(before, digest(*c.inputs))
                + (output_problems(c.out, c.script) if c.out else []))
    assert not problems, "\n".join(problems)


# --- kill -9 of training; spaces, non-ASCII and one slice end to end ----------------------------
def weights_problems(run: Path) -> dict:
    """{checkpoint: why} for every *.weights.h5 (not a temporary) h5py cannot read."""
    return {str(p): why for p in run.rglob("*.weights.h5")
            if not TMP_NAME.match(p.name) and (why := unreadable(p))}


@dataclass
class Interrupted:
    data: Path  # "daten mit leer ü/Patient ä 1/{quarter,full}_3mm/0001.dcm": ONE slice
    run: Path
    after_kill: Path  # copy of the run folder right after the kill
    log: str
    returncode: int
    delay: float
    data_digest: dict


@pytest.fixture(scope="module")
def interrupted_training(tmp_path_factory) -> Interrupted:
    """Mytrain.py on one slice in a non-ASCII path, SIGKILLed a random moment after the first
    epoch was saved."""
    base = tmp_path_factory.mktemp("paths")
    data = write_mayo_tree(base / "daten mit leer ü", patients=("P01",), slices=1, size=64)
    (data / "P01").rename(data / "Patient ä 1")
    run = base / "läufe mit leer" / "lauf ü"
    data_digest = digest(data)
    proc = popen("Mytrain.py", "--data", data, "--out", run, *TINY, "--epochs", "100",
                 log=base / "train.log")
    deadline = time.monotonic() + 900
    while not (run / "state" / "state.json").exists() and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    delay = random.uniform(0.0, 3.0)  # somewhere in the next epochs, saves included
    time.sleep(delay)
    proc.kill()
    proc.wait()
    after_kill = base / "after kill"
    if run.exists():
        shutil.copytree(run, after_kill)
    return Interrupted(data, run, after_kill, (base / "train.log").read_text(), proc.returncode,
                       delay, data_digest)


@pytest.fixture(scope="module")
def resumed_training(interrupted_training):
    """--resume of the killed run for one more epoch, with stale temporaries of a dead writer
    planted beside the checkpoints (a kill during a save leaves such files)."""
    run = interrupted_training.run
    if not (run / "state" / "state.json").is_file():
        pytest.fail(f"training saved no epoch:\n{interrupted_training.log[-3000:]}")
    done = json.loads((run / "state" / "state.json").read_text())["epoch"]
    for stale in (run / ".generator_latest.tmp999999999.weights.h5",
                  run / "state" / f".gan_epoch{done + 1:04d}.tmp999999999.weights.h5"):
        stale.write_bytes(b"\x89HDF\r\n\x1a\npartial")
    proc = cli("Mytrain.py", "--out", run, "--resume", "--epochs", done + 1, "--verbose", "2")
    return proc, done


@pytest.mark.slow
def test_kill9_during_training_leaves_every_checkpoint_readable(interrupted_training):
    it = interrupted_training
    assert it.returncode == -signal.SIGKILL, f"not killed (rc {it.returncode}):\n{it.log[-3000:]}"
    snap = it.after_kill
    json.loads((snap / "config.json").read_text())
    state = json.loads((snap / "state" / "state.json").read_text())
    assert state["epoch"] >= 1 and (snap / "state" / state["weights"]).is_file()
    names = {p.name for p in snap.rglob("*.weights.h5")}
    assert {"generator_latest.weights.h5", "generator_best.weights.h5", state["weights"]} <= names
    assert not weights_problems(snap), f"killed {it.delay:.2f} s after the first save"
    # history.csv is written just before state.json: at most one row ahead of it
    n = state["epoch"]
    assert history_epochs(snap) in (list(range(1, n + 1)), list(range(1, n + 2)))
    assert "one slice only: validation reuses the training slice" in it.log
    assert digest(it.data) == it.data_digest


@pytest.mark.slow
def test_resume_after_kill9_continues_from_the_last_finished_epoch(interrupted_training,
                                                                   resumed_training):
    run = interrupted_training.run
    proc, done = resumed_training
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {run} after epoch {done}" in proc.stdout
    assert history_epochs(run) == list(range(1, done + 2))  # consecutive, no duplicates
    state = json.loads((run / "state" / "state.json").read_text())
    assert state["epoch"] == done + 1 and len(state["history"]) == done + 1
    assert not weights_problems(run)
    assert not output_problems(run, "Mytrain.py")  # stale temporaries of the dead run removed
    assert digest(interrupted_training.data) == interrupted_training.data_digest


@pytest.mark.slow
def test_spaces_non_ascii_and_one_slice_train_test_evaluate(interrupted_training,
                                                            resumed_training):
    it = interrupted_training
    assert resumed_training[0].returncode == 0, "training failed (see the resume test)"
    out = it.data.parent / "ausgabe mit leer ü"
    with unchanged(it.data, it.run):
        loader = cli("MyDataLoader_train.py", "--data", it.data)
        test = cli("Mytest.py", "--data", it.data, "--run", it.run, "--out", out,
                   "--format", "png,tiff,dicom")
        evaluation = cli("Myevaluation.py", "--pred", out)
    assert loader.returncode == 0, loader.stderr
    assert "one slice only: validation reuses the training slice" in loader.stdout
    assert test.returncode == 0, test.stderr
    (row,) = manifest_rows(out)
    assert row["patient"] == "Patient ä 1" and row["fd_path"] and row["dicom"]
    assert not output_problems(out, "Mytest.py")
    assert evaluation.returncode == 0, evaluation.stderr
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_slices"] == 1 and report["per_patient"]["Patient ä 1"]["n_slices"] == 1
    assert "Traceback" not in loader.stderr + test.stderr + evaluation.stderr


# --- kill -9 of inference -----------------------------------------------------------------------
@pytest.mark.slow
def test_kill9_during_inference_then_rerun_completes(tmp_path, latest_run):
    n = 24
    data = write_mayo_tree(tmp_path / "serie", patients=("P01",), slices=n, size=64)
    out = tmp_path / "out"
    args = ["--data", data, "--run", latest_run, "--out", out, "--batch", "1", "--format",
            "png,tiff"]
    with unchanged(data, latest_run):
        proc = popen("Mytest.py", *args, log=tmp_path / "test.log")
        deadline = time.monotonic() + 600
        # manifest.csv is written first (empty): wait for its first row, the first slice done
        while not ((out / "manifest.csv").exists() and manifest_rows(out)) \
                and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.kill()
        proc.wait()
        log = (tmp_path / "test.log").read_text()
        assert proc.returncode == -signal.SIGKILL, f"not killed mid-run:\n{log[-3000:]}"
        done = manifest_rows(out)
        assert 0 < len(done) < n
        # what the manifest lists is complete; only a temporary of the dead writer may remain
        assert not [p for p in output_problems(out, "Mytest.py") if "temporary" not in p]
        rerun = cli("Mytest.py", *args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipping {len(done)} finished slice(s)" in rerun.stdout
    rows = manifest_rows(out)
    ids = [r["slice_id"] for r in rows]
    assert len(ids) == len(set(ids)) == n  # one row per slice
    assert not output_problems(out, "Mytest.py")
    for pattern, col in (("P01/*.npy", "pred_npy"), ("P01/*.png", "png"), ("P01/*.tif", "tiff"),
                         ("figures/*.png", "figure")):
        assert sorted(str(p.relative_to(out)) for p in out.glob(pattern)) == \
            sorted(r[col] for r in rows), f"{pattern}: duplicated or orphaned outputs"
