"""ctrun: the one owner of the run folder, config.json, weights names and the manifest."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

import ctio
import ctrun


def test_config_round_trip_and_migration_of_version_1(tmp_path):
    model = ctrun.model_config("small", depth=3)
    ctrun.write_run_config(tmp_path, {"model": model, "train": {"precision": "bfloat16"}})
    cfg = ctrun.read_run_config(tmp_path)
    assert cfg["version"] == ctrun.CONFIG_VERSION and cfg["model"] == model
    assert cfg["train"]["precision"] == "bfloat16"

    # Version 1 (no "version" key counts as 1) had --mixed-precision beside --precision.
    for old, want in (({"mixed_precision": True, "precision": "float32"}, "float16"),
                      ({"mixed_precision": False}, "float32")):
        (tmp_path / "config.json").write_text(json.dumps({"model": model, "train": old}))
        cfg = ctrun.read_run_config(tmp_path)
        assert cfg["train"]["precision"] == want and "mixed_precision" not in cfg["train"]
        assert cfg["version"] == ctrun.CONFIG_VERSION


@pytest.mark.parametrize("cfg, needle", [
    ({"version": ctrun.CONFIG_VERSION + 1, "model": {}}, "newer than this code"),
    ({"train": {}}, "no \"model\" section"),
    ({"model": {"preset": "small", "base_filters": 8, "depth": 3, "norm": "batch"}},
     "older version of this tool"),  # no "arch": network version 1
    ({"model": {**ctrun.model_config("small"), "depth": "x"}}, "depth must be"),
    ({"model": ctrun.model_config("small"), "normalization": {"hu_min": -1000}},
     "normalization.hu_min"),
])
def test_bad_configs_are_one_error_naming_the_file(tmp_path, cfg, needle):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ctio.CTDataError, match=needle) as e:
        ctrun.read_run_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and "\n" not in str(e.value)


def test_generator_weights_snapshots_and_latest_run(tmp_path):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    with pytest.raises(ctio.CTDataError, match="no generator_best.weights.h5 or generator_latest"):
        ctrun.generator_weights(run)
    (run / ctrun.LATEST).write_bytes(b"x")
    assert ctrun.generator_weights(run, "best") == run / ctrun.LATEST  # falls back
    (run / ctrun.BEST).write_bytes(b"x")
    assert ctrun.generator_weights(run, "best") == run / ctrun.BEST
    assert ctrun.generator_weights(run, "latest") == run / ctrun.LATEST
    assert ctrun.snapshot_epoch(ctrun.snapshot_path(run, 12)) == 12
    assert ctrun.snapshot_epoch(run / ctrun.BEST) is None
    with pytest.raises(ctio.CTDataError, match="no training run"):
        ctrun.find_latest_run(tmp_path / "runs")
    ctrun.write_run_config(run, {"model": ctrun.model_config("small")})
    assert ctrun.find_latest_run(tmp_path / "runs") == run


def test_state_keeps_only_the_named_weights_and_summary_reads_it(tmp_path):
    run = tmp_path / "run"
    (run / ctrun.STATE).mkdir(parents=True)
    for e in (1, 2):
        (run / ctrun.STATE / ctrun.state_weights_name(e)).write_bytes(b"w")
    history = [{"epoch": 1, "minutes": 1.5}, {"epoch": 2, "minutes": 3.0}]
    ctrun.write_state(run, {"epoch": 2, "weights": ctrun.state_weights_name(2),
                            "history": history, "best_epoch": 1})
    assert sorted(p.name for p in (run / ctrun.STATE).iterdir()) == \
        [ctrun.state_weights_name(2), ctrun.STATE_JSON]
    assert ctrun.read_state(run)["epoch"] == 2
    ctrun.write_history(run, history)
    ctrun.write_run_config(run, {"model": ctrun.model_config("small"),
                                 "train": {"steps_per_epoch": 10}})
    assert ctrun.training_summary(run, str(run / ctrun.BEST)) == \
        {"epochs": 1, "minutes": 1.5, "steps": 10, "snapshot": False}
    assert ctrun.training_summary(run, str(run / ctrun.LATEST))["epochs"] == 2
    assert ctrun.training_summary(tmp_path / "nothing") == {}


def test_manifest_round_trip_sorted_by_position(tmp_path):
    rows = [{**dict.fromkeys(ctrun.MANIFEST_FIELDS, ""), "patient": "P", "slice_id": s,
             "position": pos, "pred_npy": f"P/{s}.npy"} for s, pos in (("b", "-3"), ("a", "0"))]
    assert ctrun.read_manifest(tmp_path) == []
    ctrun.write_manifest(tmp_path, rows[::-1])
    assert [r["slice_id"] for r in ctrun.read_manifest(tmp_path)] == ["b", "a"]
    (tmp_path / ctrun.MANIFEST).write_text("patient,slice_id\nP,a\n")
    with pytest.raises(ctio.CTDataError, match="not a Mytest.py manifest"):
        ctrun.read_manifest(tmp_path)


def test_run_folder_and_presets_need_no_tensorflow():
    code = ("import sys, ctrun, Mytest, Myevaluation; ctrun.model_config('paper'); "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
