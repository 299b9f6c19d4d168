"""Mytrain.py as users run it: files written, resume, and bad flags (issue: CNCL training)."""

import csv
import json
import subprocess
import sys

import h5py
import pytest
from conftest import REPO

TINY = ["--preset", "small", "--patch", "32", "--batch", "4", "--steps-per-epoch", "2",
        "--val-slices", "1", "--verbose", "2"]


def train(*args, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "Mytrain.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def history_epochs(run):
    with open(run / "history.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def one_clean_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.slow
def test_train_writes_run_and_resume_adds_one_epoch(mayo_tree, tmp_path):
    run = tmp_path / "run"
    p = train("--data", mayo_tree, "--out", run, "--epochs", "1", "--snapshot-every", "1", *TINY)
    assert p.returncode == 0, p.stderr
    for name in ("config.json", "generator_latest.weights.h5", "generator_best.weights.h5",
                 "history.csv", "state/state.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["preset"] == "small" and cfg["normalization"]["hu_min"] == -1024
    assert cfg["data"]["val_patients"] == ["P02"] and cfg["data"]["train_patients"] == ["P01"]
    assert history_epochs(run) == [1]
    with h5py.File(run / "state" / json.loads((run / "state/state.json").read_text())["weights"]) \
            as f:
        names = []
        f.visit(names.append)
    assert any("optimizer" in n for n in names), "training state must include the optimizers"

    p = train("--out", run, "--resume", "--epochs", "2", "--verbose", "2")
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stdout
    assert history_epochs(run) == [1, 2]
    # --snapshot-every is part of the run's config: the resumed epoch is kept too
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "generator_epoch0001.weights.h5", "generator_epoch0002.weights.h5"]
    assert json.loads((run / "state/state.json").read_text())["epoch"] == 2
    assert not list(run.rglob(".*tmp*")), "no temporary files left behind"

    # The same run folder again without --resume is refused.
    one_clean_error(train("--data", mayo_tree, "--out", run, *TINY), "already holds a run")


@pytest.mark.slow
def test_jit_flag_trains_with_xla_and_is_kept_for_resume(mayo_tree, tmp_path):
    run = tmp_path / "run"
    p = train("--data", mayo_tree, "--out", run, "--epochs", "1", "--jit", *TINY)
    assert p.returncode == 0, p.stderr
    assert json.loads((run / "config.json").read_text())["train"]["jit"] is True
    with open(run / "history.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["l1_content"]) > 0 and float(row["val_psnr"]) > 0


def test_resume_with_nothing_to_resume(tmp_path):
    one_clean_error(train("--out", tmp_path / "empty", "--resume"), "no training state")


@pytest.mark.parametrize("flags,needle", [
    (["--preset", "huge"], "unknown preset"),
    (["--patch", "36"], "not divisible"),
    (["--patch", "128"], "larger than the slice"),
    (["--val-patients", "P01", "P02"], "empty training split"),
    (["--snapshot-every", "-1"], "--snapshot-every"),
])
def test_bad_training_flags(mayo_tree, tmp_path, flags, needle):
    args = ["--data", mayo_tree, "--out", tmp_path / "run", *TINY, *flags]
    one_clean_error(train(*args), needle)
    assert not (tmp_path / "run" / "generator_latest.weights.h5").exists()
