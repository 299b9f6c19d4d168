"""The Makefile's data targets, dry-run (``make -n``): no command writes into the sample data.

A variable defined twice in a Makefile silently takes its last value in every recipe; this
caught an output folder that had come to point at the input data."""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("train-mayo", "train-mayo-psnr", "train-mayo-all", "train-mayo-all-psnr", "eval-mayo",
           "cv-mayo", "cv-mayo-psnr", "ablate-mayo", "demo")
OUTPUT_FLAGS = ("--out", "--cache-dir", "--figure")


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
@pytest.mark.parametrize("target", TARGETS)
def test_no_target_writes_into_the_sample_data(target, tmp_path):
    data = tmp_path / "shared_data"
    (data / "mayo_pairs").mkdir(parents=True)
    proc = subprocess.run(["make", "-n", target, f"CT_SAMPLE_DATA={data}",
                           f"CV_DATA=$(MAYO_REAL) {data}/L067_full_1mm"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout.replace("\\\n", " "), comments=False, posix=True)
    outputs = [words[i + 1] for i, w in enumerate(words[:-1]) if w in OUTPUT_FLAGS]
    assert outputs or target == "demo", proc.stdout  # the check looked at something
    for out in outputs:
        path = (REPO / out).resolve()
        assert not path.is_relative_to(data.resolve()), f"{target}: {out} inside the input data"
