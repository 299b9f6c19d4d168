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
