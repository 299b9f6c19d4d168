"""Shared test helpers: the repository on sys.path, the real-data folder, quiet TF, one CLI
runner (``cli``) and one check of a clean failure (``assert_one_error_line``), tiny DICOM trees
and run folders."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# The one environment of every CLI a test runs: TF quiet, no debug tracebacks, warnings default.
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": ""}
ENV.pop("CNCL_DEBUG", None)


def cli(script: str, *args, timeout: float = 600, env: dict = None) -> subprocess.CompletedProcess:
    """Run ``python SCRIPT ARGS`` from the repository like a user (output captured); ``env``
    entries are added to :data:`ENV`."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**ENV, **(env or {})})


def assert_one_error_line(proc: subprocess.CompletedProcess, *needles, code: int = None) -> None:
    """``proc`` failed cleanly: non-zero exit (``code`` if given), exactly one stderr line that
    starts with "error: ", no traceback, every needle in that line."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 if code is None else proc.returncode == code, \
        (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


def sample_data() -> Path:
    """The real sample data (CT_SAMPLE_DATA, default ../shared/data beside the repository)."""
    return Path(os.environ.get("CT_SAMPLE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def real_data() -> Path:
    """Skip the test when the real sample data is absent (as on a user's machine)."""
    root = sample_data()
    if not (root / "mayo_pairs").is_dir():
        pytest.skip(f"real sample data not found at {root} (set CT_SAMPLE_DATA)")
    return root


def write_mayo_tree(root: Path, patients=("P01", "P02"), slices: int = 3, size: int = 64,
                    noise_hu: float = 30.0, seed: int = 0) -> Path:
    """A small paired Mayo tree ROOT/<patient>/{quarter_3mm,full_3mm}/NNNN.dcm.

    FD is a smooth disc phantom (body ~40 HU in air); QD = FD + Gaussian noise. File names are
    written in reverse z order, so listing order differs from table position.
    """
    import numpy as np

    import ctio

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    for p_i, patient in enumerate(patients):
        study = ctio.new_uid()
        series = {"full_3mm": ctio.new_uid(), "quarter_3mm": ctio.new_uid()}
        for s in range(slices):
            fd = np.where(r < size * 0.4, 40.0, -1000.0) + 20 * np.sin(xx / 5.0 + s + p_i)
            fd[r < size * 0.1] = 300.0
            ld = fd + rng.normal(0, noise_hu, fd.shape)
            z = -3.0 * s
            for side, img in (("full_3mm", fd), ("quarter_3mm", ld)):
                hdr = ctio.new_ct_header(patient_id=patient, study_uid=study,
                                         series_uid=series[side], instance=s + 1, z_mm=z,
                                         shape=img.shape)
                folder = root / patient / side
                folder.mkdir(parents=True, exist_ok=True)
                ctio.write_dicom(folder / f"{slices - s:04d}.dcm", img, hdr,
                                 series_uid=series[side], description=side, derived=False)
    return root


@pytest.fixture
def mayo_tree(tmp_path) -> Path:
    """Two patients x three 64x64 QD/FD DICOM pairs."""
    return write_mayo_tree(tmp_path / "mayo")


def make_run(run: Path, base: int = 8, depth: int = 3, model: dict = None,
             weights: str = "best") -> Path:
    """A run folder as Mytrain.py writes it: config.json (``model``, default the small preset at
    ``base``/``depth``) and untrained (identity) generator weights of ``base``/``depth`` in
    ``generator_<weights>.weights.h5``."""
    import ctio
    import ctrun

    ctio.import_tensorflow()
    import Mymodel

    run.mkdir(parents=True)
    model = model or ctrun.model_config("small", base_filters=base, depth=depth, disc_filters=8)
    ctrun.write_run_config(run, {"model": model, "normalization": {"hu_min": ctio.HU_MIN,
                                                                   "hu_max": ctio.HU_MAX}})
    Mymodel.build_generator(base, depth, "batch").save_weights(
        str(run / ctrun.GENERATOR[weights]))
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """An inference run folder (untrained generator, base 8, depth 3, generator_best only)."""
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


def history_epochs(run: Path) -> list[int]:
    """The epoch column of RUN/history.csv."""
    import csv

    with open(run / "history.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]
