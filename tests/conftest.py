"""Shared test fixtures: the repository on sys.path, the real-data folder, quiet TF."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
