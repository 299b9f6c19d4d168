"""Mycrossval.py: the fold design, the fold table (mean ± sd), resume and clean refusals. No
training: the per-fold subprocesses are replaced by a stub runner that writes a metrics.json."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_error_line, cli, write_mayo_tree

import Mycrossval


@pytest.fixture
def two_folders(tmp_path) -> list[Path]:
    """Like the real pairs: one folder with 1 pair of patient A01, one with 3 pairs of B02."""
    return [write_mayo_tree(tmp_path / "a", patients=("A01",), slices=1, size=32),
            write_mayo_tree(tmp_path / "b", patients=("B02",), slices=3, size=32, seed=1)]


def fake_metrics(k: int) -> dict:
    """metrics.json of fold k as Myevaluation writes it (only the fields the table reads);
    the soft-tissue bias only on even folds, noise ROIs only on folds 1 and 2."""
    cncl = {"redcnn": {"psnr": {"mean": 30.0 + k}, "ssim": {"mean": 0.9 - 0.01 * k},
                       "rmse": {"mean": 12.0 - k}}}
    fd = {}
    if k <= 2:
        cncl["noise"] = {"noise_std": {"mean": 10.0 * k}, "nps_mean_freq": {"mean": 0.1 * k}}
        fd["noise"] = {"noise_std": {"mean": 20.0}, "nps_mean_freq": {"mean": 0.4}}
    if k % 2 == 0:
        cncl["bias"] = {"soft": {"mean": 0.5 * k}, "all": {"mean": 9.0}}
    ldct = {"redcnn": {"psnr": {"mean": 28.0}}, "bias": {"soft": {"mean": -0.25 * k}}}
    return {"overall": {"cncl": cncl, "fd": fd, "ldct": ldct}}


class StubRunner:
    """Records each command; 'runs' Myevaluation by writing fake_metrics for the fold."""

    def __init__(self, fail: str = None):
        self.calls, self.fail = [], fail

    def __call__(self, cmd, log: Path) -> int:
        self.calls.append(list(cmd))
        log.write_text("stub\n")
        script = Path(cmd[1]).name
        if script == self.fail:
            return 3
        if script == "Myevaluation.py":
            test = Path(cmd[cmd.index("--pred") + 1])
            test.mkdir(parents=True, exist_ok=True)
            k = int(test.parent.name.split("_")[1])
            (test / "metrics.json").write_text(json.dumps(fake_metrics(k)))
        return 0


def _args(data, out, *extra):
    return ["--data", *map(str, data), "--out", str(out), "--epochs", "2", *extra]


def test_each_pair_tested_once_never_validated_on(two_folders, tmp_path):
    args, flags = Mycrossval.build_parser().parse_known_args(_args(two_folders, tmp_path / "o"))
    plan = Mycrossval.prepare(args, flags)
    specs = [f.spec for f in plan.folds]
    pairs = [f"{r.patient}:{r.slice_id}" for d in two_folders
             for r in Mycrossval.ctdata.discover(d).records]
    assert len(pairs) == 4 and sorted(specs) == sorted(pairs)  # every pair, once
    assert [f.val for f in plan.folds] == ["none", "A01", "A01", "A01"]  # fewest pairs
    for fold in plan.folds:
        train, test, evaluate = Mycrossval.fold_commands(plan, fold)
        assert train[train.index("--exclude") + 1] == fold.spec
        val = train[train.index("--val-patients") + 1]
        assert val != fold.patient and val == fold.val
        assert train[-2:] == ["--epochs", "2"]  # the recipe passes through
        assert test[test.index("--slices") + 1] == fold.spec
        assert test[test.index("--data") + 1] == str(fold.data)
        assert test[test.index("--precision") + 1] == "float32"
        assert evaluate[-1] == test[test.index("--out") + 1]
    assert not (tmp_path / "o").exists()  # prepare writes nothing


def test_fold_placeholder_in_a_training_flag(two_folders, tmp_path):
    """{fold} in a flag passed to Mytrain.py becomes the fold number (a fine-tune per fold from
    another cross-validation's fold run)."""
    init = str(tmp_path / "cv-l1" / "fold_{fold}" / "run" / "generator_latest.weights.h5")
    args, flags = Mycrossval.build_parser().parse_known_args(
        _args(two_folders, tmp_path / "o", "--init-generator", init))
    plan = Mycrossval.prepare(args, flags)
    for fold in plan.folds:
        train = Mycrossval.fold_commands(plan, fold)[0]
        assert train[-1] == init.replace("{fold}", str(fold.k)) and f"fold_{fold.k}" in train[-1]


def test_real_pairs_fold_design(real_data, tmp_path):
    data = [real_data / "mayo_pairs" / d for d in ("npy_redcnn", "tif_cncl")]
    args, flags = Mycrossval.build_parser().parse_known_args(_args(data, tmp_path / "o"))
    folds = Mycrossval.prepare(args, flags).folds
    assert [f.spec for f in folds] == ["L067:L067_0001", *(f"L506:{s}" for s in range(0, 201, 40))]
    assert [f.val for f in folds] == ["none"] + ["L067"] * 6


def test_table_mean_sd_and_resume(two_folders, tmp_path, capsys):
    out = tmp_path / "cv"
    stub = StubRunner()
    assert Mycrossval.main(_args(two_folders, out, "--folds", "1", "2", "3"), runner=stub) == 0
    assert len(stub.calls) == 9 and not (out / "fold_4").exists()
    text = capsys.readouterr().out
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["1", "2", "3", "mean ± sd"]
    psnr = 30.0 + np.arange(1, 4)
    assert f"{psnr.mean():.2f} ± {psnr.std(ddof=1):.2f}" in rows[-1]
    ratio = np.array([10.0, 20.0]) / 20.0  # ROI noise / FD: folds 1 and 2 only
    assert f"{ratio.mean():.2f} ± {ratio.std(ddof=1):.2f} (n=2)" in rows[-1]
    col = {name.strip(): i for i, name in enumerate(rows[0].split("|"))}
    bias, ldct_bias = col["soft-tissue bias (HU)"], col["LDCT soft-tissue bias (HU)"]
    assert rows[1].split("|")[bias].strip() == "-"  # fold 1: no bias entry
    assert rows[2].split("|")[bias].strip() == "1.00"  # fold 2: bias soft 0.5 * 2
    assert [r.split("|")[ldct_bias].strip() for r in rows[1:4]] == ["-0.25", "-0.50", "-0.75"]
    shift = col["model − input (HU)"]  # the model's own shift: its bias minus the input's
    assert [r.split("|")[shift].strip() for r in rows[1:4]] == ["-", "1.50", "-"]
    assert ("|soft-tissue bias| <= 1 HU: model 1 of 1 fold runs, LDCT input 3 of 3 folds; "
            "|model − input| <= 1 HU: 0 of 1 fold runs") in text  # 1.00 counts, 1.50 does not
    assert (out / "crossval.md").read_text().strip() in text

    stub2 = StubRunner()  # again, all folds: 1-3 are skipped, only fold 4 runs
    Mycrossval.main(_args(two_folders, out), runner=stub2)
    assert {Path(c[c.index("--out") + 1]).parent.name for c in stub2.calls if "--out" in c} \
        == {"fold_4"}
    assert "| 4 of 4 folds |" in capsys.readouterr().out


def test_unfinished_fold_redone_and_failure_one_line(two_folders, tmp_path):
    out = tmp_path / "cv"
    with pytest.raises(Mycrossval.ctio.CTDataError, match="fold 1: Mytest.py exited 3"):
        Mycrossval.main(_args(two_folders, out, "--folds", "1"), runner=StubRunner("Mytest.py"))
    assert not Mycrossval.metrics_path(out, 1).exists()
    (out / "fold_1" / "leftover").write_text("x")
    Mycrossval.main(_args(two_folders, out, "--folds", "1"), runner=StubRunner())
    assert Mycrossval.metrics_path(out, 1).is_file()
    assert not (out / "fold_1" / "leftover").exists()


def test_refusals(two_folders, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    cases = [(["--out", str(user)], "not a cross-validation folder"),
             (["--out", str(two_folders[0] / "cv")], "never written into the input data"),
             (["--out", str(tmp_path / "o"), "--exclude", "A01"], "set by the fold design"),
             (["--out", str(tmp_path / "o"), "--folds", "9"], "need 1..4"),
             (["--out", str(tmp_path / "o"), "--epocs", "2"], "unrecognized arguments: --epocs"),
             (["--out", str(tmp_path / "o"), "--val-patient", "Z9"], "not in the data")]
    for extra, needle in cases:
        proc = cli("Mycrossval.py", "--data", *two_folders, *extra, timeout=120)
        assert_one_error_line(proc, needle, code=2)
    assert (user / "notes.txt").read_text() == "keep" and len(list(user.iterdir())) == 1
    assert not (tmp_path / "o").exists() and not (two_folders[0] / "cv").exists()


def test_other_settings_refused(two_folders, tmp_path):
    out = tmp_path / "cv"
    Mycrossval.main(_args(two_folders, out, "--folds", "1"), runner=StubRunner())
    proc = cli("Mycrossval.py", *_args(two_folders, out, "--adv-weight", "0"), timeout=120)
    assert_one_error_line(proc, "other settings", "train_flags", code=2)


def test_compare_seeds_side_by_side(two_folders, tmp_path, capsys):
    """--compare: a row per cross-validation (its mean over folds) and, per fold, each one's bias
    and model - input with their sd over the cross-validations; other folds are refused."""
    a, b = tmp_path / "cv-a", tmp_path / "cv-b"
    Mycrossval.main(_args(two_folders, a), runner=StubRunner())
    Mycrossval.main(_args(two_folders, b, "--seed", "1", "--folds", "1", "2"), runner=StubRunner())
    report = json.loads(Mycrossval.metrics_path(b, 2).read_text())
    report["overall"]["cncl"]["bias"]["soft"]["mean"] = 2.0  # the rerun moved fold 2 by +1 HU
    Mycrossval.metrics_path(b, 2).write_text(json.dumps(report))
    capsys.readouterr()
    assert Mycrossval.main(["--compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    rows = [[c.strip() for c in ln.strip("|").split("|")]
            for ln in text.splitlines() if ln.startswith("| ")]
    # fold runs with a bias: a's folds 2 (1.0) and 4 (2.0), b's fold 2 (2.0); the input once a fold
    assert ("model 1 of 3 fold runs, LDCT input 4 of 4 folds; |model − input| <= 1 HU: 0 of 3 "
            "fold runs") in text
    psnr = 30.0 + np.arange(1, 5)
    assert rows[1][:3] == ["cv-a", "4 of 4", f"{psnr.mean():.2f} ± {psnr.std(ddof=1):.2f}"]
    assert rows[2][:3] == ["cv-b", "2 of 4", "31.50 ± 0.71"]
    per_fold = {r[0]: r for r in rows[4:]}
    sd = f"{np.std([1.0, 2.0], ddof=1):.2f}"
    assert per_fold["2"][2:] == ["-0.50", "1.00 / 2.00", "1.50 / 2.50", sd]
    assert per_fold["4"][3:] == ["2.00 / -", "3.00 / -", "-"]  # fold 4 not run in cv-b

    one = tmp_path / "cv-one"  # one folder's pairs only: other folds
    Mycrossval.main(_args(two_folders[1:], one, "--folds", "1"), runner=StubRunner())
    for extra, needle in (([str(a), str(one)], "other folds than"),
                          ([str(a), str(two_folders[0])], "not a cross-validation folder"),
                          ([str(a), "--epochs", "3"], "--epochs does not go with it")):
        assert_one_error_line(cli("Mycrossval.py", "--compare", *extra, timeout=120), needle,
                              code=2)


def test_full_dose_only_folder_trains_in_every_fold_never_tested(two_folders, tmp_path):
    """A full-dose-only --data folder joins every fold's training (with --simulate-dose) and
    gives no fold; without --simulate-dose it is refused before anything is written."""
    import shutil

    fd_only = write_mayo_tree(tmp_path / "fd", patients=("S03",), slices=2, size=32, seed=2)
    shutil.rmtree(fd_only / "S03" / "quarter_3mm")
    data = [*two_folders, fd_only]
    args, flags = Mycrossval.build_parser().parse_known_args(
        _args(data, tmp_path / "o", "--simulate-dose", "0.25", "--simulated-share", "0.2"))
    plan = Mycrossval.prepare(args, flags)
    assert [f.spec for f in plan.folds] == [f.spec for f in Mycrossval.prepare(
        *Mycrossval.build_parser().parse_known_args(_args(two_folders, tmp_path / "o"))).folds]
    for fold in plan.folds:
        train, test, _ = Mycrossval.fold_commands(plan, fold)
        assert str(fd_only.resolve()) in train[train.index("--data"):train.index("--out")]
        assert train[-4:] == ["--simulate-dose", "0.25", "--simulated-share", "0.2"]
        assert test[test.index("--data") + 1] != str(fd_only.resolve())
    proc = cli("Mycrossval.py", *_args(data, tmp_path / "o"), timeout=120)
    assert_one_error_line(proc, "full-dose slices without low-dose pairs",
                          "add --simulate-dose 0.25", code=2)
    assert not (tmp_path / "o").exists()
