"""Mytrain.py as users run it: files written, resume, and bad flags (issue: CNCL training)."""

import csv
import json
import sys
from pathlib import Path

import h5py
import pytest
from conftest import assert_one_error_line, cli, history_epochs, write_mayo_tree

import ctio
import ctmachine

TINY = ["--preset", "small", "--patch", "32", "--batch", "4", "--steps-per-epoch", "2",
        "--val-slices", "1", "--verbose", "2"]


def train(*args, timeout=300):
    return cli("Mytrain.py", *args, timeout=timeout)


def h5_arrays(path: Path, under: str = "") -> dict:
    with h5py.File(path) as f:
        return {name[len(under):]: f[name][()] for name in _datasets(f) if name.startswith(under)}


def _datasets(f) -> list:
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def assert_latest_is_the_moving_average(run: Path) -> None:
    """generator_latest holds the state's ema_generator weights, which differ from G's."""
    state = run / "state" / json.loads((run / "state/state.json").read_text())["weights"]
    latest = h5_arrays(run / "generator_latest.weights.h5")
    ema, gen = h5_arrays(state, "ema_generator/"), h5_arrays(state, "generator/")
    assert latest.keys() == ema.keys() == gen.keys() and latest
    assert all((latest[k] == ema[k]).all() for k in latest)
    assert any((latest[k] != gen[k]).any() for k in latest)


@pytest.mark.slow
def test_train_writes_run_and_resume_adds_one_epoch(tmp_path):
    mayo_tree = write_mayo_tree(tmp_path / "mayo", size=128)  # body ROIs for the texture probe
    run = tmp_path / "run"
    p = train("--data", mayo_tree, "--out", run, "--epochs", "1", "--snapshot-every", "1",
              "--select", "texture", "--ema-decay", "0.9", *TINY)
    assert p.returncode == 0, p.stderr
    for name in ("config.json", "generator_latest.weights.h5", "generator_best.weights.h5",
                 "history.csv", "state/state.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["preset"] == "small" and cfg["normalization"]["hu_min"] == -1024
    assert cfg["data"]["val_patients"] == ["P02"] and cfg["data"]["train_patients"] == ["P01"]
    assert history_epochs(run) == [1]
    # --select texture: the noise-only texture of simulated quarter dose of the validation
    # slice, every epoch (ctselect)
    assert cfg["select"]["criterion"] == "texture" and cfg["train"]["select"] == "texture"
    with open(run / "history.csv") as f:
        row = next(csv.DictReader(f))
    assert 0 < float(row["val_noise_ratio"]) and 0 < float(row["val_nps_fav_ratio"])
    state = json.loads((run / "state/state.json").read_text())
    assert state["best_epoch"] == 1 and "texture" in state["best_reason"]
    with h5py.File(run / "state" / json.loads((run / "state/state.json").read_text())["weights"]) \
            as f:
        names = []
        f.visit(names.append)
    assert any("optimizer" in n for n in names), "training state must include the optimizers"
    assert cfg["train"]["ema_decay"] == 0.9  # --ema-decay: the run saves the moving average
    assert_latest_is_the_moving_average(run)

    p = train("--out", run, "--resume", "--epochs", "2", "--verbose", "2")
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stdout
    assert history_epochs(run) == [1, 2]
    # --snapshot-every is part of the run's config: the resumed epoch is kept too
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "generator_epoch0001.weights.h5", "generator_epoch0002.weights.h5"]
    assert json.loads((run / "state/state.json").read_text())["epoch"] == 2
    assert_latest_is_the_moving_average(run)
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2  # the new total
    assert not list(run.rglob(".*tmp*")), "no temporary files left behind"

    # The same run folder again without --resume is refused.
    assert_one_error_line(train("--data", mayo_tree, "--out", run, *TINY), "already holds a run")

    # --init-generator: a new run starts from this run's generator (at a learning rate too small
    # to move it, its generator is the file's); the file and its hash are recorded; a generator
    # of another model is one error line, with nothing written.
    init = run / "generator_latest.weights.h5"
    p = train("--data", mayo_tree, "--out", tmp_path / "tuned", "--epochs", "1", "--lr", "1e-9",
              "--val-patients", "none", "--init-generator", init, *TINY)
    assert p.returncode == 0, p.stderr
    assert f"generator initialised from {init}" in p.stdout
    tuned, start = h5_arrays(tmp_path / "tuned" / "generator_latest.weights.h5"), h5_arrays(init)
    assert tuned.keys() == start.keys()
    # every weight but batch norm's moving statistics (vars/2, vars/3), which training updates
    # whatever the learning rate
    learned = [k for k in tuned if not ("batch_normalization" in k and k[-2:] in ("/2", "/3"))]
    assert 100 < len(learned) < len(tuned)
    assert max(float(abs(tuned[k] - start[k]).max()) for k in learned) < 1e-6
    recorded = json.loads((tmp_path / "tuned" / "config.json").read_text())["init_generator"]
    assert recorded["path"] == str(init.resolve()) and len(recorded["sha256"]) == 64
    p = train("--data", mayo_tree, "--out", tmp_path / "paper", "--init-generator", init,
              *TINY, "--preset", "paper")
    assert_one_error_line(p, "--init-generator", "does not fit this run's generator")
    assert not list((tmp_path / "paper").rglob("*")), "nothing written"


def test_resume_with_nothing_to_resume(tmp_path):
    assert_one_error_line(train("--out", tmp_path / "empty", "--resume"), "no training state")


@pytest.mark.parametrize("flags,needle", [
    (["--preset", "huge"], "unknown preset"),
    (["--patch", "36"], "not divisible"),
    (["--patch", "128"], "larger than the slice"),
    (["--val-patients", "P01", "P02"], "empty training split"),
    (["--snapshot-every", "-1"], "--snapshot-every"),
    (["--time-limit", "-5"], "--time-limit"),
    (["--steps-per-epoch", "-1"], "--steps-per-epoch"),
    (["--beta-2", "1"], "--beta-1 and --beta-2"),
    (["--recipe", "fast"], "--recipe: invalid choice"),
])
def test_bad_training_flags(mayo_tree, tmp_path, flags, needle):
    args = ["--data", mayo_tree, "--out", tmp_path / "run", *TINY, *flags]
    assert_one_error_line(train(*args), needle)
    assert not (tmp_path / "run" / "generator_latest.weights.h5").exists()


@pytest.mark.slow
def test_whole_slice_training_with_validation_slices_of_three_sizes(tmp_path):
    """--patch 0 trains on whole slices; validation patients of 64^2, 48^2 and 32^2 slices go
    through one validation pass (shapes unknown when traced); --val-slices caps what is
    printed and recorded."""
    root = tmp_path / "mixed"
    for patient, size in (("P01", 64), ("P02", 48), ("P03", 32)):
        write_mayo_tree(root, patients=(patient,), slices=3, size=size)
    run = tmp_path / "run"
    p = train("--data", root, "--out", run, "--preset", "small", "--patch", "0", "--batch", "2",
              "--steps-per-epoch", "1", "--epochs", "1", "--val-patients", "P02", "P03",
              "--val-slices", "4", "--verbose", "2")
    assert p.returncode == 0, p.stderr
    assert "4 validation slices" in p.stdout
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["val_slices"] == 4 and cfg["train"]["patch"] == 0
    with open(run / "history.csv") as f:
        row = next(csv.DictReader(f))
    assert 10 < float(row["val_psnr"]) < 80 and float(row["l1_content"]) > 0


@pytest.mark.slow
def test_no_validation_run_with_xla_and_l1_warmup_trains_and_saves(mayo_tree, tmp_path):
    """--val-patients none: every slice trains and the first checkpoint is written (issue 16);
    --jit: the steps are XLA-compiled and the flag is recorded; --l1-warmup 0.5: epoch 1
    trains without the adversarial term (D neither evaluated nor trained), epoch 2 with it (one
    run for all three: each training process costs a minute of the suite)."""
    run = tmp_path / "run"
    p = train("--data", mayo_tree, "--out", run, "--epochs", "2", "--val-patients", "none",
              "--jit", "--l1-warmup", "0.5", *TINY)
    assert p.returncode == 0, p.stderr
    assert (run / "generator_best.weights.h5").is_file() and history_epochs(run) == [1, 2]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["val_slices"] == 0 and cfg["train"]["jit"] is True
    assert cfg["train"]["l1_warmup_epochs"] == 1
    assert cfg["select"]["criterion"] == "last"  # auto, with the cpu recipe's adversarial term
    state = json.loads((run / "state/state.json").read_text())
    assert state["best_reason"] == "no validation: the last epoch" and state["best_epoch"] == 2
    with open(run / "history.csv") as f:
        warm, adv = csv.DictReader(f)
    assert float(warm["l1_content"]) > 0 and "val_psnr" not in warm
    assert float(warm["g_adv"]) == float(warm["d_loss"]) == 0.0
    assert float(adv["g_adv"]) > 0 and float(adv["d_loss"]) > 0
    assert "L1 warm-up: epoch 1 of 2 without the adversarial term" in p.stdout
    assert "epoch 2: L1 warm-up done" in p.stdout


def test_l1_warmup_is_a_fraction_of_the_epochs_fixed_when_the_run_starts(tmp_path):
    """floor(--l1-warmup x --epochs) epochs, none without an adversarial term; a continued run
    keeps the count in its config.json whatever its new --epochs (prepare: no TensorFlow)."""
    import ctrun
    import Mytrain

    data = write_mayo_tree(tmp_path / "data", patients=("P01", "P02"), slices=1, size=32)
    base = ["--data", str(data), "--out", str(tmp_path / "run")]
    for flags, want in ((["--epochs", "10", "--l1-warmup", "0.5"], 5),
                        (["--epochs", "3", "--l1-warmup", "0.5"], 1),
                        (["--epochs", "1", "--l1-warmup", "0.5"], 0),
                        (["--epochs", "10", "--l1-warmup", "0.5", "--adv-weight", "0"], 0),
                        (["--epochs", "10"], int(Mytrain.RECIPES["cpu"]["l1_warmup"] * 10)),
                        (["--epochs", "10", "--l1-warmup", "0.5", "--l1-warmup-epochs", "3"], 3)):
        assert Mytrain.prepare([*base, *flags]).args.l1_warmup_epochs == want, flags
    run = tmp_path / "old"
    (run / "state").mkdir(parents=True)
    saved = vars(Mytrain.apply_recipe(Mytrain.parse_args(["--epochs", "4", "--l1-warmup", "0.5"])))
    ctrun.write_run_config(run, {"model": ctrun.model_config("small"), "train": {
        **{k: v for k, v in saved.items() if k not in ("resume", "out")}, "data": [str(data)],
        "l1_warmup_epochs": 2}})
    ctrun.write_state(run, {"epoch": 4, "weights": "w", "history": []})
    plan = Mytrain.prepare(["--out", str(run), "--resume", "--epochs", "20"])
    assert plan.args.l1_warmup_epochs == 2 and plan.args.epochs == 20


def test_a_continued_run_takes_every_flag_from_its_config(tmp_path):
    """--resume (and a multi-worker rerun) read config.json once: every training flag comes from
    there except --epochs, --verbose and --strategy; an older config is migrated."""
    import ctrun
    import Mytrain

    run = tmp_path / "run"
    saved = vars(Mytrain.apply_recipe(Mytrain.parse_args(
        ["--recipe", "paper", "--jit", "--snapshot-every", "3", "--lr", "0.5"])))
    train_cfg = {k: v for k, v in saved.items() if k not in ("resume", "out")}
    train_cfg.pop("precision")
    train_cfg["mixed_precision"] = True  # version 1 spelling of --precision float16
    (run / ctrun.STATE).mkdir(parents=True)
    (run / ctrun.CONFIG).write_text(json.dumps({"version": 1, "model": ctrun.model_config("paper"),
                                                "train": train_cfg}))
    (run / ctrun.STATE / ctrun.STATE_JSON).write_text(json.dumps({"epoch": 1, "history": []}))
    args = Mytrain.parse_args(["--out", str(run), "--resume", "--epochs", "9", "--lr", "1"])
    args, cfg, continues = Mytrain.resolve_run(args, is_chief=True, n_workers=1)
    assert continues == "resume" and cfg["model"]["preset"] == "paper"
    assert (args.jit, args.snapshot_every, args.lr, args.epochs) == (True, 3, 0.5, 9)
    assert args.recipe == "paper" and args.patch == 0 and Mytrain.train_precision(args) == "float16"
    # A new run in a folder that holds one is refused; several workers' chief continues it.
    with pytest.raises(ctio.CTDataError, match="already holds a run"):
        ctrun.check_new_run(run)
    args = Mytrain.parse_args(["--out", str(run), "--epochs", "9"])
    assert Mytrain.resolve_run(args, is_chief=True, n_workers=2)[2] == "restart"
    assert Mytrain.resolve_run(args, is_chief=False, n_workers=2)[2] == ""


def test_recipes_fill_only_unset_flags():
    import Mytrain

    args = Mytrain.apply_recipe(Mytrain.parse_args(["--recipe", "paper", "--epochs", "3"]))
    official = Mytrain.RECIPES["paper"]
    assert args.epochs == 3  # explicit flags win
    assert (args.preset, args.batch, args.patch, args.lr, args.beta_1, args.beta_2,
            args.augment) == ("paper", 2, 0, 2e-5, 0.5, 0.999, False)
    assert args.lambda_l1 == official["lambda_l1"] == Mytrain.OFFICIAL_LAMBDA
    assert args.block_mean_weight == args.spectrum_weight == 0.0  # the official loss only
    assert args.ema_decay == args.l1_warmup == 0.0  # and the official training
    cpu = Mytrain.apply_recipe(Mytrain.parse_args([]))
    assert cpu.recipe == "cpu" and cpu.patch >= 96  # larger than D's 94-pixel receptive field
    assert cpu.block_mean_weight == 5.0 and cpu.l1_warmup == 0.5 and cpu.ema_decay == 0.0
    import ctrun

    old = ctrun.migrate_config({"version": 2, "train": {"recipe": "cpu", "lr": 1e-3}})
    # a run made before the terms, the average and the warm-up kept without them
    assert old["train"]["block_mean_weight"] == old["train"]["spectrum_weight"] == 0.0
    assert old["train"]["ema_decay"] == old["train"]["l1_warmup"] == 0.0
    assert old["train"]["l1_warmup_epochs"] == 0


def test_cpu_kernels_chosen_only_where_tf_would_not_and_the_user_did_not(monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    avx2 = frozenset({"avx2", "fma"})
    assert ctmachine.choose_cpu_kernels(False, "why", avx2) is None  # no gain: TF's default
    assert "TF_ENABLE_ONEDNN_OPTS" not in __import__("os").environ
    vnni = frozenset({"avx2", "avx512f", "avx512_vnni"})
    assert ctmachine.choose_cpu_kernels(True, "why", vnni) is None  # TF turns it on by itself
    msg = ctmachine.choose_cpu_kernels(True, "faster", avx2)
    assert "oneDNN (faster" in msg and __import__("os").environ["TF_ENABLE_ONEDNN_OPTS"] == "1"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # the user's choice wins
    assert ctmachine.choose_cpu_kernels(True, "faster", avx2) is None


def test_demo_test_patient_is_held_out_like_any_exclude(tmp_path, monkeypatch):
    """No --data: the demo's test patient goes through --exclude (recorded in config.json's
    train.exclude, so --resume holds it out too); prepare() needs no TensorFlow."""
    import ctfixtures
    import Mytrain

    demo = ctfixtures.make_demo(tmp_path / "demo", slices=2, size=64)
    monkeypatch.setattr(Mytrain, "DEMO_DIR", demo)
    plan = Mytrain.prepare(["--out", str(tmp_path / "run"), "--exclude", "DEMO01:0001"])
    test_patient = ctfixtures.DEMO_TEST_PATIENT
    assert plan.args.exclude == ["DEMO01:0001", test_patient]
    assert test_patient not in plan.dataset.patients and "DEMO01" in plan.dataset.patients
    assert all((r.patient, r.slice_id) != ("DEMO01", "0001") for r in plan.dataset.records)
    assert plan.data == [str(demo)] and plan.continues == ""


# --- Issue 26: flags and folders checked before any work; non-finite losses; --resume notes -----
def _digest(root):
    import hashlib

    return {p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in [root, *sorted(root.rglob("*"))]}


def test_bad_numbers_and_output_folders_refused_before_any_work(tmp_path):
    """Every float flag must be finite, the seed in NumPy's range, and the run folder and slice
    cache writable folders outside (and not around) the input data: one CTDataError from
    prepare(), which imports no TensorFlow, and the data folder stays byte-identical."""
    import Mytrain

    data = write_mayo_tree(tmp_path / "data", patients=("P01", "P02"), slices=1, size=32)
    (tmp_path / "a_file").write_text("x")
    before = _digest(data)
    base = ["--data", str(data), "--out", str(tmp_path / "run")]
    cases = {
        "--lr nan": ("--lr nan: need a finite number",),
        "--lambda-l1 inf": ("--lambda-l1 inf: need a finite number",),
        "--adv-weight -inf": ("--adv-weight -inf: need a finite number",),
        "--beta-1 nan": ("--beta-1 nan",), "--time-limit inf": ("--time-limit inf",),
        "--simulate-dose nan": ("--simulate-dose nan",),
        "--seed -1": ("--seed -1",),
        "--block-mean-weight -1": ("--block-mean-weight must be >= 0",),
        "--spectrum-weight -0.5": ("--spectrum-weight must be >= 0",),
        "--spectrum-weight nan": ("--spectrum-weight nan: need a finite number",),
        "--ema-decay 1": ("--ema-decay must be in [0, 1)",),
        "--ema-decay nan": ("--ema-decay nan: need a finite number",),
        f"--init-generator {tmp_path}/a_file": ("a_file", "not a Keras .weights.h5 file"),
        f"--init-generator {tmp_path}/none.h5": ("none.h5", "weights file not found"),
        "--l1-warmup 1": ("--l1-warmup must be in [0, 1)",),
        "--l1-warmup-epochs 10": ("--l1-warmup-epochs must be in [0, --epochs)",),  # cpu: 10
        "--l1-warmup nan": ("--l1-warmup nan: need a finite number",),
        "--simulated-share 1": ("--simulated-share must be in (0, 1)",),
        "--simulated-share 0.3": ("--simulated-share needs --simulate-dose",),
        f"--out {data}/run": ("--out", "inside the input folder"),
        f"--out {tmp_path}": ("--out", "holds the input folder"),
        f"--cache-dir {data}/P01/cache": ("--cache-dir", "inside the input folder"),
        f"--cache-dir {tmp_path}/a_file": ("--cache-dir", "exists and is not a folder"),
    }
    if Path("/sys").is_dir():  # a folder even root cannot write in
        cases["--out /sys/cncl-run"] = ("--out /sys/cncl-run", "cannot write in /sys")
    for flags, needles in cases.items():
        flag, value = flags.split(" ", 1)
        with pytest.raises(ctio.CTDataError) as e:
            Mytrain.prepare([*base, f"{flag}={value}"])
        for needle in needles:
            assert needle in str(e.value), (flags, str(e.value))
    with pytest.raises(ctio.CTDataError, match="needs --patch 0 or >= 16"):
        Mytrain.prepare([*base, "--block-mean-weight", "1", "--patch", "8"])
    with pytest.raises(ctio.CTDataError, match="found 2 real and 0 full-dose-only"):
        Mytrain.prepare([*base, "--simulate-dose", "0.25", "--simulated-share", "0.3",
                         "--val-patients", "none"])
    assert _digest(data) == before and not (tmp_path / "run").exists()
    p = cli("Mytrain.py", *base, "--lr", "nan")
    assert_one_error_line(p, "--lr nan", code=2)


def test_resume_names_the_flags_it_ignores_and_keeps_the_saved_epochs(tmp_path, capsys):
    """--resume with flags the run does not use: one note: line naming them (not those equal to
    the saved values, nor --epochs); without --epochs the saved total stays;
    ctrun.record_epochs writes a new total into config.json."""
    import ctrun
    import Mytrain

    run = tmp_path / "run"
    saved = vars(Mytrain.apply_recipe(Mytrain.parse_args(["--lr", "0.001"])))
    (run / ctrun.STATE).mkdir(parents=True)
    ctrun.write_run_config(run, {"model": ctrun.model_config("small"),
                                 "train": {k: v for k, v in saved.items()
                                           if k not in ("resume", "out")}})
    (run / ctrun.STATE / ctrun.STATE_JSON).write_text(json.dumps({"epoch": 1, "history": []}))
    args = Mytrain.parse_args(["--out", str(run), "--resume", "--lr", "0.5", "--preset", "paper",
                               "--batch", str(saved["batch"]), "--no-augment", "--epochs", "4"])
    args, _, _ = Mytrain.resolve_run(args, is_chief=True, n_workers=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: "), lines
    assert "--lr 0.5" in lines[0] and "--preset paper" in lines[0] and "--no-augment" in lines[0]
    assert "--batch" not in lines[0].split("ignoring")[1] and "--epochs 4" not in lines[0]
    assert (args.lr, args.preset, args.epochs, args.augment) == (0.001, "small", 4, True)
    args, _, _ = Mytrain.resolve_run(Mytrain.parse_args(["--out", str(run), "--resume"]),
                                     is_chief=True, n_workers=1)
    assert args.epochs == saved["epochs"] and capsys.readouterr().out == ""
    ctrun.record_epochs(run, 4)
    assert json.loads((run / ctrun.CONFIG).read_text())["train"]["epochs"] == 4
    assert ctrun.read_run_config(run)["model"] == ctrun.model_config("small")


def test_a_non_finite_loss_stops_training_and_keeps_the_last_finite_state(tmp_path):
    """Real fit with make_callbacks: the second epoch's data holds NaN, so its loss is NaN at its
    first step. Training stops there, nothing of that epoch is saved (every file of the run
    folder byte-identical to after epoch 1, its weights finite), and the guard says where."""
    import numpy as np

    ctio.import_tensorflow()
    import keras
    import tensorflow as tf

    import ctrun
    import Mymodel
    import Mytrain

    gan = Mymodel.CNCLGAN(*Mymodel.build_models(ctrun.model_config(
        "small", base_filters=4, depth=2, disc_filters=4)))
    gan.compile(g_optimizer=keras.optimizers.Adam(1e-3), d_optimizer=keras.optimizers.Adam(1e-3),
                run_eagerly=True)  # three steps: tracing would cost more than running
    gan(np.zeros((1, 16, 16, 1), np.float32))
    x = np.random.default_rng(0).uniform(0.2, 0.3, (8, 16, 16, 1)).astype(np.float32)
    x[4:] = np.nan  # batches 3 and 4: the second epoch
    ds = tf.data.Dataset.from_tensor_slices((x, x)).batch(2)
    state = {"epoch": 0, "history": []}
    cbs = Mytrain.make_callbacks(tmp_path, gan, state, None, keras, tf)
    snapshot = {}

    class AfterEpoch1(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                snapshot.update(_digest(tmp_path))

    gan.fit(ds, epochs=3, steps_per_epoch=2, callbacks=[*cbs, AfterEpoch1()], verbose=0,
            shuffle=False)
    assert state["epoch"] == 1 and ctrun.read_state(tmp_path)["epoch"] == 1
    assert cbs[0].bad.endswith("at epoch 2, step 1") and "nan" in cbs[0].bad, cbs[0].bad
    after = _digest(tmp_path)
    after = {p: h for p, h in after.items() if ctrun.TENSORBOARD not in p.parts}
    assert after == {p: h for p, h in snapshot.items() if ctrun.TENSORBOARD not in p.parts}
    saved = Mymodel.build_generator(4, 2, "batch")
    saved.load_weights(str(tmp_path / ctrun.LATEST))
    assert all(np.isfinite(w).all() for w in saved.get_weights())
    msg = Mytrain.nonfinite_message(cbs[0].bad, state, tmp_path)
    assert "keeps the state of epoch 1" in msg and "--lr" in msg
