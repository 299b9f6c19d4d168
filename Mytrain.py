"""Train CNCL (content-noise complementary GAN) for low-dose CT denoising.

    python Mytrain.py                                   # built-in demo data (created if absent)
    python Mytrain.py --data PATH --out runs/mine --preset small --epochs 20
    python Mytrain.py --out runs/mine --resume --epochs 30   # continue a run

RUN_DIR receives:
  config.json                    everything needed to rebuild the model and the normalisation
  generator_latest.weights.h5    generator after the last finished epoch
  generator_best.weights.h5      generator with the best validation PSNR so far
  state/                         full training state (G, D, both optimizers, epoch) for --resume
  history.csv                    one row per finished epoch
  tensorboard/                   scalars and LD / denoised / FD panels

Every file is written under a temporary name and renamed, and state/state.json (the epoch counter)
is written last, so killing the process at any moment leaves the previous epoch's complete state.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import ctio

REPO = Path(__file__).resolve().parent
DEMO_DIR = REPO / "data" / "demo"  # where the built-in demo dataset is created
CONFIG_VERSION = 1
STRATEGIES = ("auto", "default", "mirrored", "multiworker")

# The official loss balance in this project's normalisation. The official code normalises each
# image as (HU - mean_LD) / var_LD, so an L1 error there is 4096 / var_LD times the same error in
# (HU + 1024) / 4096 units; its lambda 100 is therefore 100 * 4096 / var_LD here. var_LD measured
# on the 7 real quarter-dose slices in ../shared/data (L506 x 6, L067 x 1): 213,000-251,000 HU^2
# (std 462-501 HU), median 236,727 -> 1.73 (range 1.63-1.92).
OFFICIAL_LAMBDA = 1.73

# Training recipes: every flag below, filled in where the command line leaves it unset.
RECIPES: dict[str, dict] = {
    # The official code's training (code/train.py): the paper network, whole 512^2 slices,
    # batch 2, Adam 2e-5 (0.5, 0.999), no augmentation, 300 passes over the data.
    "paper": {"preset": "paper", "epochs": 300, "steps_per_epoch": 0, "batch": 2, "patch": 0,
              "lr": 2e-5, "beta_1": 0.5, "beta_2": 0.999, "lr_decay": "none",
              "lambda_l1": OFFICIAL_LAMBDA, "adv_weight": 1.0, "augment": False},
    # Fast CPU recipe: small network, 128^2 patches (larger than the discriminator's 94-pixel
    # receptive field, so the adversarial term sees texture), augmentation.
    "cpu": {"preset": "small", "epochs": 10, "steps_per_epoch": 100, "batch": 4, "patch": 128,
            "lr": 2e-4, "beta_1": 0.5, "beta_2": 0.999, "lr_decay": "none",
            "lambda_l1": OFFICIAL_LAMBDA, "adv_weight": 1.0, "augment": True},
}
DEFAULT_RECIPE = "cpu"


def _recipe_help() -> str:
    lines = [f"{name}: " + ", ".join(f"{k.replace('_', '-')} {v:g}" if isinstance(v, float)
                                     else f"{k.replace('_', '-')} {v}" for k, v in r.items())
             for name, r in RECIPES.items()]
    return ("training recipe: defaults for the flags it names; flags given explicitly win. "
            + "; ".join(lines))


def apply_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag the command line left unset (None) from ``args.recipe``."""
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


TRAIN_PRECISIONS = ("float32", "bfloat16", "float16")  # --precision (ctio.PRECISION_POLICIES)


def parse_args(argv=None) -> argparse.Namespace:
    ap = ctio.ArgumentParser(
        description="Train CNCL on paired (or simulated) low-dose / full-dose CT.",
        formatter_class=ctio.HelpFormatter)
    ap.add_argument("--data", nargs="+", default=None,
                    help="dataset folder(s), any layout the loaders read; default: the built-in "
                         f"demo data in {DEMO_DIR.relative_to(REPO)} (created if absent)")
    ap.add_argument("--layout", choices=ctio.LAYOUTS, default=None,
                    help="override layout auto-detection")
    ap.add_argument("--simulate-dose", type=float, default=None,
                    help="simulate this dose fraction for full-dose-only slices")
    ap.add_argument("--out", default=None,
                    help="run folder; default runs/<preset>-<data name>")
    ap.add_argument("--recipe", choices=tuple(RECIPES), default=DEFAULT_RECIPE,
                    help=_recipe_help())
    ap.add_argument("--preset", default=None, help="model preset: small or paper (recipe)")
    ap.add_argument("--epochs", type=int, default=None, help="total number of epochs (recipe)")
    ap.add_argument("--steps-per-epoch", type=int, default=None,
                    help="batches per epoch; 0: one pass over the training slices (recipe)")
    ap.add_argument("--batch", type=int, default=None,
                    help="global batch size (patches or slices) (recipe)")
    ap.add_argument("--patch", type=int, default=None,
                    help="patch size; 0 trains on whole slices (recipe)")
    ap.add_argument("--patches-per-slice", type=int, default=8,
                    help="random patches cut from each decoded slice")
    ap.add_argument("--lr", type=float, default=None,
                    help="Adam learning rate, both networks (recipe)")
    ap.add_argument("--beta-1", type=float, default=None, help="Adam beta_1 (recipe)")
    ap.add_argument("--beta-2", type=float, default=None, help="Adam beta_2 (recipe)")
    ap.add_argument("--lr-decay", choices=("none", "cosine"), default=None,
                    help="learning-rate schedule over the whole run (recipe)")
    ap.add_argument("--lambda-l1", type=float, default=None,
                    help="weight of mean(|content - FD|, |noise - (LD - FD)|) against the "
                    f"adversarial loss; {OFFICIAL_LAMBDA} is the official balance in this "
                    "normalisation (recipe)")
    ap.add_argument("--adv-weight", type=float, default=None,
                    help="weight of the adversarial term (0: L1 only, no discriminator "
                    "updates) (recipe)")
    ap.add_argument("--val-patients", nargs="+", default=None,
                    help="validation patients; default the last patient, 'none' for none")
    ap.add_argument("--exclude", nargs="+", default=None, metavar="SPEC",
                    help="hold slices out of training and validation (for a held-out test): "
                         "PATIENT or PATIENT:SLICE, e.g. L506:160 L506:200")
    ap.add_argument("--time-limit", type=float, default=0.0, metavar="MINUTES",
                    help="stop after the epoch that passes this much training time (0: none)")
    ap.add_argument("--snapshot-every", type=int, default=0, metavar="EPOCHS",
                    help="also keep the generator every this many epochs in RUN/snapshots/ "
                    "(generator_epochNNNN.weights.h5; for a curve of test metrics against "
                    "training time; 0: none)")
    ap.add_argument("--val-slices", type=int, default=8,
                    help="at most this many whole validation slices (evenly spaced)")
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                    help="random flips / 90-degree rotations (recipe)")
    ap.add_argument("--keep-air", action="store_true",
                    help="do not skip air-only patches")
    ap.add_argument("--seed", type=int, default=0, help="seed for Python, NumPy and TF")
    ap.add_argument("--cache-dir", default=None,
                    help="folder for decoded training slices (float32 .npy, ~2 MB per 512^2 "
                    "pair, read memory-mapped; several runs on the same data can share one); "
                    "default RUN/cache")
    ap.add_argument("--jit", action="store_true",
                    help="XLA-compile the train and validation steps (jit_compile); the paper "
                    "preset's CPU step was 14%% faster (README Benchmark); compiling takes a while")
    ap.add_argument("--precision", choices=TRAIN_PRECISIONS, default="float32",
                    help="compute precision (variables, outputs and losses stay float32): "
                    "bfloat16 = Keras mixed_bfloat16, no loss scaling (fast only on CPUs with "
                    f"{' or '.join(ctio.BF16_FLAGS)}, and on GPUs/TPUs); float16 = "
                    "mixed_float16 with both optimizers in a LossScaleOptimizer (GPU)")
    ap.add_argument("--mixed-precision", action="store_true",
                    help="the same as --precision float16")
    ap.add_argument("--strategy", choices=STRATEGIES, default="auto",
                    help="auto: MultiWorkerMirrored when TF_CONFIG is set, Mirrored when more "
                         "than one GPU is visible, else the default strategy")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its last finished epoch")
    ap.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                    help="Keras fit verbosity: 1 progress bar, 2 one line per epoch")
    return ap.parse_args(argv)


# --- Checks that need no TensorFlow -------------------------------------------------------------
def check_args(args) -> None:
    """Fail fast on bad flags, before the slow TensorFlow import."""
    for name in ("epochs", "batch", "patches_per_slice", "val_slices"):
        if getattr(args, name) < 1:
            raise ctio.CTDataError(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps_per_epoch < 0:
        raise ctio.CTDataError("--steps-per-epoch must be 0 (one pass) or positive")
    if args.time_limit < 0:
        raise ctio.CTDataError("--time-limit must be 0 (none) or positive minutes")
    if not (0 <= args.beta_1 < 1 and 0 <= args.beta_2 < 1):
        raise ctio.CTDataError("--beta-1 and --beta-2 must be in [0, 1)")
    if getattr(args, "snapshot_every", 0) < 0:
        raise ctio.CTDataError("--snapshot-every must be 0 (none) or positive")
    if args.patch < 0:
        raise ctio.CTDataError("--patch must be 0 (whole slices) or positive")
    if args.lr <= 0 or args.lambda_l1 < 0 or args.adv_weight < 0:
        raise ctio.CTDataError("--lr must be positive; --lambda-l1 and --adv-weight >= 0")
    if args.simulate_dose is not None and not 0 < args.simulate_dose < 1:
        raise ctio.CTDataError(f"--simulate-dose must be in (0, 1), got {args.simulate_dose}")


def train_precision(args) -> str:
    """The compute precision of ``args``: ``--precision``, or float16 for ``--mixed-precision``
    (the older flag; a resumed run's config.json may hold only that one)."""
    precision = getattr(args, "precision", None) or "float32"
    if getattr(args, "mixed_precision", False):
        if precision not in ("float32", "float16"):
            raise ctio.CTDataError(f"--mixed-precision means --precision float16, which "
                                   f"contradicts --precision {precision}")
        return "float16"
    return precision


def check_run_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / "state" / "state.json").is_file():
            raise ctio.CTDataError(f"--resume: {out} holds no training state to resume "
                                   "(no state/state.json)")
        return
    if out.exists() and not out.is_dir():
        raise ctio.CTDataError(f"--out {out}: exists and is not a folder")
    if (out / "config.json").exists():
        raise ctio.CTDataError(f"--out {out}: already holds a run; add --resume to continue "
                               "it or choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise ctio.CTDataError(f"--out {out}: folder is not empty")


def load_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    cfg = ctio.read_json(path, f"{path}: no config.json in the run folder")
    try:
        cfg["model"]["base_filters"], cfg["model"]["depth"]  # noqa: B018 (presence check)
    except (KeyError, TypeError) as e:
        raise ctio.CTDataError(f"{path}: not a valid run configuration ({e})") from None
    return cfg


def write_json(path: Path, obj) -> None:
    with ctio.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


# --- Distribution -------------------------------------------------------------------------------
def worker_role(strategy: str = "auto") -> tuple[bool, int]:
    """(is_chief, number of workers) from TF_CONFIG; a malformed TF_CONFIG is a CTDataError.

    Checked before TensorFlow starts: a bad cluster description must fail in one line, not leave
    workers waiting for peers that can never connect. TF_CONFIG needs --strategy auto or
    multiworker (with default / mirrored each worker would train alone).
    """
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return True, 1

    def bad(why: str) -> ctio.CTDataError:
        return ctio.CTDataError(f"TF_CONFIG: {why}")

    try:
        cfg = json.loads(raw)
    except ValueError as e:
        raise bad(f"not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise bad('want a JSON object {"cluster": {...}, "task": {...}}')
    cluster, task = cfg.get("cluster"), cfg.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise bad('no "cluster" (want e.g. {"worker": ["host1:port", "host2:port"]})')
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise bad('no "task" (want e.g. {"type": "worker", "index": 0})')
    other = sorted(set(cluster) - {"chief", "worker"})
    if other:
        raise bad(f"job {', '.join(other)} not supported (MultiWorkerMirroredStrategy uses "
                  "'chief' and 'worker')")
    seen = set()
    for job, addrs in cluster.items():
        if not isinstance(addrs, list) or not addrs:
            raise bad(f'cluster "{job}" must be a non-empty list of "host:port"')
        for addr in addrs:
            host, _, port = str(addr).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise bad(f"bad address {addr!r} in \"{job}\" (want host:port)")
            if addr in seen:
                raise bad(f"address {addr} appears twice in the cluster")
            seen.add(addr)
    if len(cluster.get("chief", [])) > 1:
        raise bad("at most one chief")
    ttype, index = task["type"], task["index"]
    if ttype not in cluster:
        raise bad(f'task type {ttype!r} is not a job of the cluster ({", ".join(cluster)})')
    if isinstance(index, bool) or not isinstance(index, int) \
            or not 0 <= index < len(cluster[ttype]):
        raise bad(f"task index {index!r} out of range: \"{ttype}\" has "
                  f"{len(cluster[ttype])} address(es), index 0..{len(cluster[ttype]) - 1}")
    if strategy not in ("auto", "multiworker"):
        raise ctio.CTDataError(f"--strategy {strategy} with TF_CONFIG set: use --strategy "
                               "multiworker (or auto) for a cluster, or unset TF_CONFIG")
    chief = ttype == "chief" or (ttype == "worker" and index == 0 and "chief" not in cluster)
    return chief, len(seen)


def make_strategy(name: str, tf):
    """The tf.distribute strategy for --strategy (auto: by TF_CONFIG, then by visible GPUs).

    Call it before anything creates a tensor: MultiWorkerMirroredStrategy configures the
    collective runtime, which must not be initialised yet (listing devices is fine).
    """
    if name == "auto":
        if os.environ.get("TF_CONFIG", "").strip():
            name = "multiworker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def shard_by_data(ds, tf):
    """Shard a dataset of GLOBAL batches over workers by element: each global batch is split
    into per-replica batches (batch / replicas each). The pipeline reads no files, so sharding
    by file (AUTO's first choice) does not apply; every worker runs it and keeps its share."""
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(opts)


def prepare_for_fit(gan, strategy, size: int, n_workers: int, tf) -> None:
    """Adapt the model to `strategy` where Keras 3.15 `fit` falls short (keras-team/keras#20585).

    MultiWorkerMirroredStrategy:
    * `fit` starts with a symbolic build that calls `strategy.reduce("MEAN", (ld, fd))` on the
      first batch, which this strategy cannot do for a tuple ("Attempt to convert a value
      (PerReplica ...)"). That build only creates variables that do not exist yet: G, D and both
      optimizers are built by compile and the model by the call below (BackupAndRestore also
      needs it built), so the build is skipped.
    * With several workers Keras reduces each step's logs with `strategy.reduce("MEAN", value,
      axis=0)`, which fails for scalars ("Invalid reduction dimension 0"): logs get a length-1
      axis.
    Any strategy with several replicas: Keras reports the MEAN over replicas of each replica's
    own running means, wrong when replicas see different numbers of images (validation slices
    are batched by 1, so most replicas see none and e.g. PSNR comes out halved). The steps
    instead report the global mean: each metric's total and count summed over the replicas.
    """
    import numpy as np

    mwms = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    # Built here whatever the strategy: without validation nothing else builds the wrapper
    # before the first checkpoint is saved.
    gan(np.zeros((1, size, size, 1), np.float32))
    if mwms:
        gan._maybe_symbolic_build = lambda *args, **kwargs: None
    if strategy.num_replicas_in_sync == 1:
        return
    shape = [1] if mwms and n_workers > 1 else []

    def global_logs(step):
        def run(data):
            logs = step(data)
            means = [m for m in gan.metrics if m.name in logs]
            sums = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM,
                [tf.stack([tf.convert_to_tensor(m.total), tf.convert_to_tensor(m.count)])
                 for m in means])
            logs.update({m.name: tf.math.divide_no_nan(t[0], t[1]) for m, t in zip(means, sums)})
            return {k: tf.reshape(v, shape) for k, v in logs.items()}
        return run

    gan.train_step = global_logs(gan.train_step)
    gan.test_step = global_logs(gan.test_step)


def backup_epoch(backup_dir: Path) -> int:
    """Epochs finished according to a BackupAndRestore folder (0: none saved yet)."""
    try:
        return int(json.loads((backup_dir / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def make_backup_callback(backup_dir: Path, is_chief: bool, strategy, keras, tf):
    """keras.callbacks.BackupAndRestore for multi-worker runs: a restarted cluster resumes.

    Only the chief keeps a backup (RUN_DIR/backup, deleted by Keras when fit ends). On start the
    chief restores it and every worker then takes the chief's epoch and weights (G, D, both
    optimizers) by an all-reduce, so a worker restarted on another machine, with no files of its
    own, continues in step instead of training from scratch beside the others.
    """

    class ChiefBackupAndRestore(keras.callbacks.BackupAndRestore):
        def on_train_begin(self, logs=None):
            epoch = 0
            if is_chief and (backup_dir / "latest.weights.h5").is_file():
                # load_weights directly: the stock restore would first build the wrapper's unused
                # default optimizer on the chief only (variable creation is collective: a hang).
                self.model.load_weights(str(backup_dir / "latest.weights.h5"))
                epoch = backup_epoch(backup_dir)
            epoch = int(from_chief([tf.constant(epoch, tf.int64)])[0])
            if epoch:
                variables = list({id(v): v for v in self.model.variables
                                  + _optimizer_variables(self.model)}.values())
                for v, value in zip(variables, from_chief(variables)):
                    v.assign(value)
                self.model._initial_epoch = epoch

        def _save_model(self):
            if is_chief:
                super()._save_model()

        def on_train_end(self, logs=None):
            if is_chief:
                super().on_train_end(logs)

    def from_chief(values: list) -> list:
        """The chief's values on every worker: all-reduces (sum, one per dtype) of the chief's
        values and zeros from the others."""

        def replica_fn():
            mine = [tf.identity(v) if is_chief else tf.zeros(v.shape, v.dtype) for v in values]
            out = list(mine)
            for dtype in {t.dtype for t in mine}:
                idx = [i for i, t in enumerate(mine) if t.dtype == dtype]
                summed = tf.distribute.get_replica_context().all_reduce(
                    tf.distribute.ReduceOp.SUM, [mine[i] for i in idx])
                for i, t in zip(idx, summed):
                    out[i] = t
            return out

        summed = tf.function(lambda: strategy.run(replica_fn))()
        return [strategy.experimental_local_results(t)[0] for t in summed]

    return ChiefBackupAndRestore(str(backup_dir))


def _optimizer_variables(model) -> list:
    return [v for name in ("g_optimizer", "d_optimizer", "optimizer")
            if getattr(model, name, None) is not None for v in getattr(model, name).variables]


# --- Callbacks ----------------------------------------------------------------------------------
def make_callbacks(run_dir: Path, write_dir: Path, gan, state: dict, val_ds, keras, tf,
                   time_limit: float = 0.0, snapshot_every: int = 0):
    """The run's own checkpointing (atomic, resumable) and TensorBoard panels.

    ``snapshot_every`` > 0 also keeps the generator of every such epoch in
    ``snapshots/generator_epochNNNN.weights.h5`` (history.csv gives its training minutes)."""

    class RunState(keras.callbacks.Callback):
        """After each epoch: latest/best generator, full state, history.csv; state.json last."""

        def on_train_begin(self, logs=None):
            self.start = time.monotonic() - 60.0 * state.get("minutes", 0.0)

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            state["minutes"] = (time.monotonic() - self.start) / 60.0  # training time, resumes add
            row = {"epoch": epoch + 1, "minutes": round(state["minutes"], 3), **logs}
            state["history"].append(row)
            if time_limit and state["minutes"] >= time_limit:
                self.model.stop_training = True
                print(f"time limit: {state['minutes']:.1f} of {time_limit:g} minutes used, "
                      "stopping after this epoch", flush=True)
            gen = gan.generator
            save_weights(gen, write_dir / "generator_latest.weights.h5")
            if snapshot_every and (epoch + 1) % snapshot_every == 0:
                (write_dir / "snapshots").mkdir(exist_ok=True)
                save_weights(gen, write_dir / "snapshots" /
                             f"generator_epoch{epoch + 1:04d}.weights.h5")
            score = logs.get("val_psnr")
            if score is not None and score > state.get("best_val_psnr", -1e9):
                state["best_val_psnr"], state["best_epoch"] = score, epoch + 1
                save_weights(gen, write_dir / "generator_best.weights.h5")
            elif score is None and not (write_dir / "generator_best.weights.h5").exists():
                save_weights(gen, write_dir / "generator_best.weights.h5")
            (write_dir / "state").mkdir(exist_ok=True)
            name = f"gan_epoch{epoch + 1:04d}.weights.h5"
            save_weights(gan, write_dir / "state" / name)
            state["epoch"], state["weights"] = epoch + 1, name
            write_history(write_dir / "history.csv", state["history"])
            write_json(write_dir / "state" / "state.json", state)
            for old in (write_dir / "state").glob("gan_epoch*.weights.h5"):
                if old.name != name:
                    old.unlink()

    class Panels(keras.callbacks.Callback):
        """LD | denoised | FD panels of the first validation slices in TensorBoard."""

        def __init__(self, batch):
            super().__init__()
            self.ld, self.fd = batch[0], batch[1]
            self.writer = tf.summary.create_file_writer(str(write_dir / "tensorboard" / "images"))

        def on_epoch_end(self, epoch, logs=None):
            out = gan(self.ld, training=False)
            panel = tf.concat([ctio.window01(ctio.denormalize(x)) for x in (self.ld, out, self.fd)],
                              axis=2)
            with self.writer.as_default():
                tf.summary.image("LD | CNCL | FD", panel, step=epoch + 1, max_outputs=2)

    cbs = [RunState(), keras.callbacks.TensorBoard(log_dir=str(write_dir / "tensorboard"),
                                                   write_graph=False, profile_batch=0)]
    if val_ds is not None:
        cbs.append(Panels(next(iter(val_ds.take(1)))))
    return cbs


def save_weights(model, path: Path) -> None:
    with ctio.atomic_path(path) as tmp:
        model.save_weights(str(tmp))


def write_history(path: Path, rows: list[dict]) -> None:
    keys = ["epoch"] + sorted({k for r in rows for k in r} - {"epoch"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    with ctio.atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


# --- Main ---------------------------------------------------------------------------------------
def resolve_data(args) -> tuple[list[str], list[str] | None, str]:
    """Data folders, patients to leave out, and a note; builds the demo data when needed."""
    if args.data:
        return args.data, None, ""
    import Mysimulate

    note = f"no --data: training on the built-in demo data in {DEMO_DIR}"
    if not (DEMO_DIR / "README.txt").is_file():
        print(f"{note} (creating it now)", flush=True)
        Mysimulate.make_demo(DEMO_DIR)
    return [str(DEMO_DIR)], [Mysimulate.DEMO_TEST_PATIENT], note


def main(argv=None) -> int:
    args = parse_args(argv)
    is_chief, n_workers = worker_role(args.strategy)
    if args.resume:
        if args.out is None:
            raise ctio.CTDataError("--resume needs --out RUN_DIR")
        out = Path(args.out)
        check_run_dir(out, resume=True)
        # temporaries left by a save that was killed
        ctio.remove_stale_temporaries([out, out / "state", out / "snapshots"])
        cfg = load_config(out)
        saved_model = cfg["model"]
        epochs = args.epochs
        args = argparse.Namespace(**{"recipe": DEFAULT_RECIPE, **cfg["train"], "epochs": epochs,
                                     "resume": True, "verbose": args.verbose,
                                     "strategy": args.strategy, "out": str(out)})
    else:
        saved_model = None
    args = apply_recipe(args)  # a resumed run's config.json holds every value already
    check_args(args)
    args.precision = train_precision(args)
    args.mixed_precision = args.precision == "float16"  # config.json: both keys agree
    if n_workers > 1 and getattr(args, "time_limit", 0.0):
        raise ctio.CTDataError("--time-limit is for single-machine runs: each worker would stop "
                               "on its own clock; use --epochs with several workers")
    data, exclude, note = resolve_data(args)
    if args.out is None:
        args.out = str(REPO / "runs" / f"{args.preset}-{Path(data[0]).name}")
    out = Path(args.out)
    # A multi-worker run that stopped before it finished left RUN_DIR/backup: the same command
    # (as a cluster manager reruns it) continues it from there.
    restart = is_chief and n_workers > 1 and not args.resume and (out / "backup").is_dir()
    if not args.resume and is_chief and not restart:
        check_run_dir(out, resume=False)

    import MyDataLoader_train as loader

    dataset = loader.find_training_data(data, args.layout, args.simulate_dose,
                                        exclude=getattr(args, "exclude", None))
    if exclude:
        dataset = dataset.for_patients([p for p in dataset.patients if p not in exclude])
    split = loader.split_patients(dataset, args.val_patients)
    split.val = loader.pick_val_slices(split.val, args.val_slices)
    if args.steps_per_epoch == 0:  # one pass over the training slices (or their patches)
        per_slice = args.patches_per_slice if args.patch else 1
        args.steps_per_epoch = max(1, -(-len(split.train) * per_slice // args.batch))

    preset = saved_model.get("preset") if saved_model else args.preset
    kernels = ctio.choose_cpu_kernels(preset == "small" and args.patch > 0,
                                      "small-preset patch training: 1.8x faster steps measured")
    tf = ctio.import_tensorflow()
    import keras

    import Mymodel

    try:  # a resumed run rebuilds exactly the saved model, even if the preset changed since
        model_cfg = (Mymodel.saved_model_config(saved_model) if saved_model
                     else Mymodel.model_config(args.preset))
    except (ValueError, TypeError) as e:
        raise ctio.CTDataError(f"{out / 'config.json'}: {e}" if saved_model
                               else f"--preset: {e}") from None
    multiple = 2 ** model_cfg["depth"]
    if args.patch % multiple:
        raise ctio.CTDataError(f"--patch {args.patch} is not divisible by 2^depth = {multiple} "
                               f"(preset {args.preset})")
    ctio.set_seed(args.seed)
    ctio.set_precision(args.precision)  # for every model built from here on
    strategy = make_strategy(args.strategy, tf)
    if args.batch % strategy.num_replicas_in_sync:
        raise ctio.CTDataError(f"--batch {args.batch} (the global batch) is not divisible by the "
                               f"{strategy.num_replicas_in_sync} replicas")
    if n_workers > 1:  # the first collective waits, without a time limit, for every worker
        print(f"{'chief' if is_chief else 'worker'} of {n_workers} workers: training starts when "
              "all are up", flush=True)

    # Only the chief writes into RUN_DIR; other workers write to a folder that is removed.
    write_dir = out if is_chief else Path(tempfile.mkdtemp(prefix="cncl-worker-"))
    write_dir.mkdir(parents=True, exist_ok=True)
    if not is_chief:  # also when main() fails before fit
        atexit.register(shutil.rmtree, write_dir, ignore_errors=True)
    total_steps = args.epochs * args.steps_per_epoch
    with strategy.scope():
        generator, discriminator = Mymodel.build_models(model_cfg)
        gan = Mymodel.CNCLGAN(generator, discriminator)

        def lr():
            if args.lr_decay == "cosine":
                return keras.optimizers.schedules.CosineDecay(args.lr, total_steps, alpha=0.05)
            return args.lr

        def adam():
            return keras.optimizers.Adam(lr(), beta_1=args.beta_1, beta_2=args.beta_2)

        try:
            gan.compile(g_optimizer=adam(), d_optimizer=adam(),
                        lambda_l1=args.lambda_l1, adv_weight=args.adv_weight,
                        jit_compile=bool(getattr(args, "jit", False)))
        except ValueError as e:
            raise ctio.CTDataError(f"--precision {args.precision}: {e}") from None
    prepare_for_fit(gan, strategy, multiple, n_workers, tf)

    state = {"epoch": 0, "history": []}
    if args.resume:
        state = json.loads((out / "state" / "state.json").read_text())
        restore_state(gan, out / "state" / state["weights"])
        print(f"resuming {out} after epoch {state['epoch']}", flush=True)
        if state["epoch"] >= args.epochs:
            print(f"nothing to do: {state['epoch']} epochs done, --epochs {args.epochs}")
            return 0
    elif restart and (out / "config.json").is_file():
        state = restart_state(out)
        print(f"restarting the interrupted multi-worker run {out} after epoch {state['epoch']}",
              flush=True)
    elif is_chief:
        config = {
            "version": CONFIG_VERSION,
            "model": model_cfg,
            "normalization": {"hu_min": ctio.HU_MIN, "hu_max": ctio.HU_MAX,
                              "formula": "(clip(HU, hu_min, hu_max) - hu_min) / "
                                         "(hu_max - hu_min)"},
            "train": {k: v for k, v in vars(args).items()
                      if k not in ("resume", "verbose", "strategy", "out")} | {"data": data},
            "data": {"layout": dataset.layout, "patients": dataset.patients,
                     "train_patients": sorted({r.patient for r in split.train}),
                     "val_patients": sorted({r.patient for r in split.val}),
                     "excluded_patients": exclude or [], "split": split.how,
                     "train_slices": len(split.train), "val_slices": len(split.val)},
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        }
        write_json(out / "config.json", config)

    # After the model and any --resume state: a failed restore writes nothing (no cache).
    cache_dir = getattr(args, "cache_dir", None) or write_dir / "cache"
    print(f"slice cache: {cache_dir} (decoding what is not there yet)", flush=True)
    try:  # decodes every training slice first: a broken file stops here, in one line
        train_ds = loader.make_train_dataset(
            split.train, patch=args.patch, batch=args.batch,
            patches_per_slice=args.patches_per_slice, simulate_dose=args.simulate_dose,
            seed=args.seed, augment_data=args.augment, skip_air=not args.keep_air,
            multiple=multiple, cache_dir=cache_dir)
    except BaseException:
        if is_chief and not args.resume and not restart:
            discard_unstarted_run(out)
        raise
    val_ds = None
    if split.val:  # one whole slice per replica and step, never an empty batch
        val_ds = loader.make_val_dataset(split.val, multiple=multiple,
                                         replicas=strategy.num_replicas_in_sync,
                                         simulate_dose=args.simulate_dose, seed=args.seed)
    if n_workers > 1:
        train_ds = shard_by_data(train_ds, tf)
        if val_ds is not None:
            val_ds = shard_by_data(val_ds, tf)

    if note:
        print(note)
    if kernels:
        print(kernels)
    print(f"data: {len(split.train)} training slices, {len(split.val)} validation slices; "
          f"{split.how}", flush=True)
    trainable = sum(math.prod(v.shape) for v in generator.trainable_variables)
    print(f"model: preset {args.preset}, generator {trainable:,} trainable parameters; "
          f"run folder {out}", flush=True)
    try:
        callbacks = make_callbacks(out, write_dir, gan, state, val_ds, keras, tf,
                                   time_limit=getattr(args, "time_limit", 0.0),
                                   snapshot_every=getattr(args, "snapshot_every", 0))
        if n_workers > 1:
            # After RunState, so state/ is never behind the backup. --resume restores state/.
            if is_chief and args.resume:
                shutil.rmtree(write_dir / "backup", ignore_errors=True)
            if is_chief:
                (write_dir / "backup").mkdir(exist_ok=True)  # marks the run as in progress
            callbacks.append(make_backup_callback(write_dir / "backup", is_chief, strategy,
                                                  keras, tf))
        gan.fit(train_ds, epochs=args.epochs, initial_epoch=state["epoch"],
                steps_per_epoch=args.steps_per_epoch, validation_data=val_ds,
                callbacks=callbacks, verbose=args.verbose, shuffle=False)
    except BaseException as e:
        if is_chief and not args.resume and not restart:
            discard_unstarted_run(out)
        if not isinstance(e, tf.errors.OpError):
            raise
        # A CTDataError raised while decoding inside tf.data (in fit, or for the first validation
        # slice taken by make_callbacks) arrives wrapped in an OpError with TF's node names and a
        # Python traceback: keep the CTDataError's own line.
        msg = " ".join(e.message.split())
        if "CTDataError:" in msg:
            msg = msg.split("CTDataError:")[-1]
            for tail in (" Traceback (most recent call last)", " [[", " {{"):
                msg = msg.split(tail)[0]
            raise ctio.CTDataError(msg.strip()) from None
        if n_workers > 1 and isinstance(e, (tf.errors.UnavailableError,
                                            tf.errors.CancelledError)):
            raise RuntimeError(f"lost contact with another worker ({type(e).__name__}); run the "
                               "same command on every worker again to continue from the last "
                               "finished epoch") from None
        raise
    finally:
        if not is_chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    if is_chief:
        best = state.get("best_val_psnr")
        print(f"done: {state['epoch']} epochs; generator weights in {out}"
              + (f" (best val PSNR {best:.2f} dB at epoch {state['best_epoch']})" if best else ""))
    return 0


def discard_unstarted_run(out: Path) -> None:
    """Remove what a new run wrote before its first epoch was saved: a config.json without
    state/state.json would block both the same command ("already holds a run") and --resume."""
    if (out / "state" / "state.json").is_file():
        return
    for name in ("config.json", "history.csv", "generator_latest.weights.h5",
                 "generator_best.weights.h5"):
        (out / name).unlink(missing_ok=True)
    for name in ("tensorboard", "state", "snapshots", "cache"):
        shutil.rmtree(out / name, ignore_errors=True)


def restart_state(out: Path) -> dict:
    """RunState's state for a restarted multi-worker run, cut back to the backup's epoch."""
    epoch = backup_epoch(out / "backup")
    try:
        state = json.loads((out / "state" / "state.json").read_text())
    except (OSError, ValueError):
        state = {"history": []}
    state["history"] = [r for r in state.get("history", []) if r.get("epoch", 0) <= epoch]
    state["epoch"] = epoch
    return state


def restore_state(gan, weights: Path) -> None:
    """Load G, D and both optimizers' state saved by RunState."""
    import numpy as np

    gan(np.zeros((1, 2 ** 6, 2 ** 6, 1), np.float32))  # builds the wrapper (G, D are functional)
    try:  # compile() has built both optimizers, so their variables exist to be loaded
        gan.load_weights(str(weights))
    except Exception as e:
        raise ctio.CTDataError(f"{weights}: cannot restore the training state ({e})") from None


if __name__ == "__main__":
    ctio.run_cli(main)
