"""Train CNCL (content-noise complementary GAN) for low-dose CT denoising.

    python Mytrain.py                                   # built-in demo data (created if absent)
    python Mytrain.py --data PATH --out runs/mine --preset small --epochs 20
    python Mytrain.py --out runs/mine --resume --epochs 30   # continue a run

RUN_DIR holds config.json, generator_{latest,best}.weights.h5, state/ (G, D, both optimizers and the
epoch: the one checkpoint, for --resume and for restarted multi-worker runs), history.csv,
tensorboard/ and the slice cache (see ctrun.py, which owns these names). Every file is written
under a temporary name and renamed, and state/state.json (the epoch counter) is written last, so
killing the process at any moment leaves the previous epoch's complete state.

Steps: ``prepare`` (flags, cluster role, run folder, model and data split; no TensorFlow) ->
``Plan`` -> ``run`` (strategy, model, state, config.json, tf.data, fit).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ctdata
import ctio
import ctmachine
import ctrun
import ctselect

REPO = Path(__file__).resolve().parent
DEMO_DIR = REPO / "data" / "demo"  # where the built-in demo dataset is created
STRATEGIES = ("auto", "default", "mirrored", "multiworker")

# The training recipes live in ctrun (MyDataLoader_train.py reports the recipe's patch size too).
OFFICIAL_LAMBDA = ctrun.OFFICIAL_LAMBDA
BLOCK_MEAN_PX = ctrun.BLOCK_MEAN_PX
RECIPES = ctrun.RECIPES
DEFAULT_RECIPE = ctrun.DEFAULT_RECIPE


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


TRAIN_PRECISIONS = ("float32", "bfloat16", "float16")  # --precision (ctmachine.PRECISION_POLICIES)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (one add_argument per flag: a table rather than logic, hence one piece).
    Recipe flags default to None and are filled by :func:`apply_recipe`."""
    ap = ctio.ArgumentParser(
        description="Train CNCL on paired (or simulated) low-dose / full-dose CT.",
        formatter_class=ctio.HelpFormatter)
    ap.add_argument("--data", nargs="+", default=None,
                    help="dataset folder(s), any layout the loaders read; default: the built-in "
                         f"demo data in {os.path.relpath(DEMO_DIR, REPO)} (created if absent)")
    ap.add_argument("--layout", choices=ctdata.LAYOUTS, default=None,
                    help="override layout auto-detection")
    ap.add_argument("--simulate-dose", type=float, default=None,
                    help="simulate this dose fraction for full-dose-only slices")
    ap.add_argument("--simulated-share", type=float, default=None, metavar="F",
                    help="with real pairs and full-dose-only slices (--simulate-dose): draw this "
                         "fraction of the training slices from the simulated ones (default: every "
                         "slice equally often)")
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
    ap.add_argument("--block-mean-weight", type=float, default=None,
                    help=f"weight of the L1 distance between the {BLOCK_MEAN_PX}x{BLOCK_MEAN_PX}"
                    "-pixel block means of content and full dose, a CT-number term beside the "
                    "official loss (Mymodel.block_mean_l1); 0: off (recipe)")
    ap.add_argument("--spectrum-weight", type=float, default=None,
                    help="weight of the log radial power spectrum distance between content and "
                    "full dose over each batch, a noise-grain term beside the official loss "
                    "(Mymodel.spectrum_l1); 0: off (recipe)")
    ap.add_argument("--l1-warmup", type=float, default=None, metavar="FRACTION",
                    help="warm start: the first floor(FRACTION x --epochs) epochs train with the "
                    "L1 terms only (no discriminator), then the adversarial term joins and "
                    "fine-tunes the generator from that L1 solution; fixed in config.json as "
                    "l1_warmup_epochs when the run starts (a --resume with more epochs keeps it); "
                    "0: adversarial from the first step (recipe)")
    ap.add_argument("--l1-warmup-epochs", type=int, default=None, metavar="N",
                    help="the warm-up as a number of epochs instead (overrides --l1-warmup)")
    ap.add_argument("--init-generator", default=None, metavar="WEIGHTS",
                    help="start the generator from these weights (a generator_*.weights.h5 of a "
                    "run with the same model, e.g. the L1 end's generator_best) instead of the "
                    "identity initialisation, and fine-tune it; D and the optimizers start "
                    "fresh. config.json records the file and its SHA-256")
    ap.add_argument("--ema-decay", type=float, default=None,
                    help="keep an exponential moving average of the generator's weights with "
                    "this decay (e.g. 0.999; the warm-up of tf.train.ExponentialMovingAverage: "
                    "min(decay, (1 + step) / (10 + step))); it is then what validation scores "
                    "and what the run saves as its generators (Mymodel.CNCLGAN); 0: none (recipe)")
    ap.add_argument("--select", choices=ctselect.CRITERIA, default="auto",
                    help="which epoch becomes generator_best: psnr (best validation PSNR), last "
                    "(the last epoch), texture (best validation PSNR among epochs whose denoised "
                    "noise keeps the input noise's NPS peak and f_av within 15 %%, on simulated "
                    "quarter dose of the validation slices; see ctselect.py), auto (last with an "
                    "adversarial term, psnr without; cross-validated) (default: %(default)s)")
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
                    f"{' or '.join(ctmachine.BF16_FLAGS)}, where a paper training step ran "
                    "2.4x faster, and on GPUs/TPUs; the same held-out Mayo quality: README "
                    "'CPU speed: bfloat16'); float16 = "
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
FLOAT_FLAGS = ("simulate_dose", "simulated_share", "lr", "beta_1", "beta_2", "lambda_l1",
               "adv_weight", "block_mean_weight", "spectrum_weight", "ema_decay", "l1_warmup",
               "time_limit")


def check_args(args) -> None:
    """Fail fast on bad flags, before the slow TensorFlow import."""
    for name in FLOAT_FLAGS:  # NaN passes every comparison below; inf trains to NaN weights
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise ctio.CTDataError(f"--{name.replace('_', '-')} {value}: need a finite number")
    if not 0 <= args.seed < 2 ** 32:
        raise ctio.CTDataError(f"--seed {args.seed}: need 0 <= seed < 2^32 (NumPy's range)")
    for name in ("epochs", "batch", "patches_per_slice", "val_slices"):
        if getattr(args, name) < 1:
            raise ctio.CTDataError(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps_per_epoch < 0:
        raise ctio.CTDataError("--steps-per-epoch must be 0 (one pass) or positive")
    if args.time_limit < 0:
        raise ctio.CTDataError("--time-limit must be 0 (none) or positive minutes")
    if not (0 <= args.beta_1 < 1 and 0 <= args.beta_2 < 1):
        raise ctio.CTDataError("--beta-1 and --beta-2 must be in [0, 1)")
    if not 0 <= args.l1_warmup < 1:
        raise ctio.CTDataError(f"--l1-warmup must be in [0, 1) (a fraction of --epochs; 0: "
                               f"none), got {args.l1_warmup}")
    if args.snapshot_every < 0:
        raise ctio.CTDataError("--snapshot-every must be 0 (none) or positive")
    if args.patch < 0:
        raise ctio.CTDataError("--patch must be 0 (whole slices) or positive")
    if args.lr <= 0 or args.lambda_l1 < 0 or args.adv_weight < 0:
        raise ctio.CTDataError("--lr must be positive; --lambda-l1 and --adv-weight >= 0")
    for name in ("block_mean_weight", "spectrum_weight"):
        if getattr(args, name) < 0:
            raise ctio.CTDataError(f"--{name.replace('_', '-')} must be >= 0")
    if not 0 <= args.ema_decay < 1:
        raise ctio.CTDataError(f"--ema-decay must be in [0, 1) (0: none), got {args.ema_decay}")
    if args.block_mean_weight > 0 and 0 < args.patch < BLOCK_MEAN_PX:
        raise ctio.CTDataError(f"--block-mean-weight needs --patch 0 or >= {BLOCK_MEAN_PX} "
                               f"(its blocks are {BLOCK_MEAN_PX} px), got --patch {args.patch}")
    if args.simulate_dose is not None and not 0 < args.simulate_dose < 1:
        raise ctio.CTDataError(f"--simulate-dose must be in (0, 1), got {args.simulate_dose}")
    if args.simulated_share is not None:
        if not 0 < args.simulated_share < 1:
            raise ctio.CTDataError(f"--simulated-share must be in (0, 1), got "
                                   f"{args.simulated_share}")
        if args.simulate_dose is None:
            raise ctio.CTDataError("--simulated-share needs --simulate-dose (the dose simulated "
                                   "for the full-dose-only slices)")


def train_precision(args) -> str:
    """The compute precision of ``args``: ``--precision``, or float16 for ``--mixed-precision``
    (the older spelling; config.json keeps only the precision, ctrun migrates older configs)."""
    precision = args.precision
    if args.mixed_precision:
        if precision not in ("float32", "float16"):
            raise ctio.CTDataError(f"--mixed-precision means --precision float16, which "
                                   f"contradicts --precision {precision}")
        return "float16"
    return precision


def check_paths(out: Optional[Path], cache_dir: Optional[str], data: list[str]) -> None:
    """The run folder and the slice cache: outside every input folder (and holding none), a
    folder where one is expected, and writable; checked before any work."""
    for flag, path in (("--out", out), ("--cache-dir", cache_dir)):
        if path is None:
            continue
        if Path(path).exists() and not Path(path).is_dir():
            raise ctio.CTDataError(f"{flag} {path}: exists and is not a folder")
        ctrun.refuse_overlap(flag, path, data)
        ctrun.check_writable(flag, path)


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


def skip_symbolic_build(gan) -> None:
    """Turn off the symbolic build Keras 3.15 ``fit`` starts with (no public switch exists).

    Under MultiWorkerMirroredStrategy it calls ``strategy.reduce("MEAN", (ld, fd))`` on the first
    batch, which fails for a tuple (keras-team/keras#20585). The build only creates variables
    that do not exist yet, and every variable here exists before ``fit``: G and D are functional
    models, both optimizers are built by ``compile``, the wrapper by ``prepare_for_fit``."""
    gan._maybe_symbolic_build = lambda *args, **kwargs: None


def prepare_for_fit(gan, strategy, size: int, n_workers: int, tf) -> None:
    """Adapt the model to `strategy` where Keras 3.15 `fit` falls short (keras-team/keras#20585).

    MultiWorkerMirroredStrategy:
    * `fit`'s symbolic build fails on the first batch: :func:`skip_symbolic_build` (the wrapper
      is built by the call below).
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
        skip_symbolic_build(gan)
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


def sync_from_chief(gan, epoch: int, is_chief: bool, strategy, tf) -> int:
    """Give every worker the chief's finished-epoch count and its G, D and optimizer variables.

    Only the chief has the run folder (state/, possibly on its own disk), so a worker restarted
    on another machine, with no files, must take the chief's state to continue in step instead of
    training from scratch beside the others. Called on every worker with several workers, always
    (fresh runs too), so the collectives always match. Each value is one all-reduce (sum, one per
    dtype) of the chief's value and zeros from the others."""
    values = [tf.constant(epoch, tf.int64)] + list(
        {id(v): v for v in gan.variables + _optimizer_variables(gan)}.values())

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
    summed = [strategy.experimental_local_results(t)[0] for t in summed]
    for v, value in zip(values[1:], summed[1:]):
        v.assign(value)
    return int(summed[0])


def _optimizer_variables(model) -> list:
    return [v for name in ("g_optimizer", "d_optimizer", "optimizer")
            if getattr(model, name, None) is not None for v in getattr(model, name).variables]


# --- Callbacks ----------------------------------------------------------------------------------
def make_callbacks(write_dir: Path, gan, state: dict, val_ds, keras, tf,
                   time_limit: float = 0.0, snapshot_every: int = 0,
                   select: str = "psnr", probe=None, l1_warmup_epochs: int = 0):
    """A guard against non-finite losses (first: ``cbs[0].bad``), the texture probe (with
    ``probe``, from :func:`texture_probe`: its figures join the epoch's logs), the run's one
    checkpoint (state/, atomic, resumable; generator_best chosen by ``select``, see ctselect)
    and TensorBoard panels.

    ``snapshot_every`` > 0 also keeps the generator of every such epoch in ``snapshots/``
    (history.csv gives its training minutes). ``l1_warmup_epochs`` > 0 trains those first epochs
    without the adversarial term (:class:`L1Warmup`)."""

    class NonFinite(keras.callbacks.Callback):
        """Stop training at the first NaN or infinite loss or metric (keras TerminateOnNaN looks
        at ``loss`` only, which this GAN does not log); ``bad`` says where. RunState then saves
        nothing of that epoch: the run keeps its last finite state."""

        bad = ""

        def on_train_batch_end(self, batch, logs=None):
            self.check(f"epoch {state['epoch'] + 1}, step {batch + 1}", logs)

        def on_epoch_end(self, epoch, logs=None):
            self.check(f"epoch {epoch + 1} (end)", logs)

        def check(self, where: str, logs) -> None:
            found = [k for k, v in (logs or {}).items() if not math.isfinite(float(v))]
            if found and not self.bad:
                self.bad = f"{found[0]} = {float(logs[found[0]])} at {where}"
            if self.bad:
                self.model.stop_training = True

    guard = NonFinite()

    class TextureProbe(keras.callbacks.Callback):
        """The noise-only texture of this epoch's generator, into ``logs`` (in place: RunState
        and TensorBoard see it)."""

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None and not guard.bad and "val_psnr" in logs:
                logs.update(probe())

    class RunState(keras.callbacks.Callback):
        """After each epoch: latest/best generator, full state, history.csv; state.json last."""

        def on_train_begin(self, logs=None):
            self.start = time.monotonic() - 60.0 * state.get("minutes", 0.0)

        def on_epoch_end(self, epoch, logs=None):
            if guard.bad:  # the weights in memory are not finite: keep the last saved state
                return
            done = epoch + 1
            logs = {k: float(v) for k, v in (logs or {}).items()}
            state["minutes"] = (time.monotonic() - self.start) / 60.0  # training time, resumes add
            state["history"].append({"epoch": done, "minutes": round(state["minutes"], 3),
                                     **logs})
            if time_limit and state["minutes"] >= time_limit:
                self.model.stop_training = True
                print(f"time limit: {state['minutes']:.1f} of {time_limit:g} minutes used, "
                      "stopping after this epoch", flush=True)
            gen = gan.denoiser()  # the moving average under --ema-decay
            save_weights(gen, write_dir / ctrun.LATEST)
            if snapshot_every and done % snapshot_every == 0:
                save_weights(gen, ctrun.snapshot_path(write_dir, done))
            if ctselect.update_best(state, select, logs, done):
                save_weights(gen, write_dir / ctrun.BEST)
            state["epoch"], state["weights"] = done, ctrun.state_weights_name(done)
            save_weights(gan, write_dir / ctrun.STATE / state["weights"])
            ctrun.write_history(write_dir, state["history"])
            ctrun.write_state(write_dir, state)  # last: names the complete epoch

    class Panels(keras.callbacks.Callback):
        """LD | denoised | FD panels of the first validation slices in TensorBoard."""

        def __init__(self, batch):
            super().__init__()
            self.ld, self.fd = batch[0], batch[1]
            self.writer = tf.summary.create_file_writer(
                str(write_dir / ctrun.TENSORBOARD / "images"))

        def on_epoch_end(self, epoch, logs=None):
            out = gan(self.ld, training=False)
            panel = tf.concat([ctio.window01(ctio.denormalize(x)) for x in (self.ld, out, self.fd)],
                              axis=2)
            with self.writer.as_default():
                tf.summary.image("LD | CNCL | FD", panel, step=epoch + 1, max_outputs=2)

    class L1Warmup(keras.callbacks.Callback):
        """Epochs before ``l1_warmup_epochs`` train with ``adv_weight = 0`` (L1 terms only, D
        neither evaluated nor updated), later ones with the compiled weight: the train step is
        traced again when the weight changes (fit calls ``model.train_function`` every step)."""

        adv_weight = gan.adv_weight

        def on_epoch_begin(self, epoch, logs=None):
            want = 0.0 if epoch < l1_warmup_epochs else self.adv_weight
            if gan.adv_weight != want:
                gan.adv_weight = want
                gan.make_train_function(force=True)
                if want:
                    print(f"epoch {epoch + 1}: L1 warm-up done, adversarial term (weight "
                          f"{want:g}) from here", flush=True)

    board = keras.callbacks.TensorBoard(log_dir=str(write_dir / ctrun.TENSORBOARD),
                                        write_graph=False, profile_batch=0)
    cbs = [guard, *([TextureProbe()] if probe is not None else []), RunState(), board,
           *([L1Warmup()] if l1_warmup_epochs else [])]
    if val_ds is not None:
        cbs.append(Panels(next(iter(val_ds.take(1)))))
    return cbs


def nonfinite_message(bad: str, state: dict, out: Path) -> str:
    """The one error line of a run stopped by a non-finite loss (make_callbacks' NonFinite)."""
    kept = (f"{out} keeps the state of epoch {state['epoch']} (the last finite one)"
            if state["epoch"] else "no epoch had finished: nothing was kept")
    return (f"training stopped: {bad} is not finite; {kept}; try a lower --lr or "
            "--lambda-l1/--adv-weight, or --precision float32")


def save_weights(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with ctio.atomic_path(path) as tmp:
        model.save_weights(str(tmp))


# --- Steps of a training run: prepare (no TensorFlow) -> Plan -> run ----------------------------
@dataclass
class Plan:
    """Everything :func:`run` needs, checked before TensorFlow is imported."""

    args: argparse.Namespace  # every training flag; a continued run's come from its config.json
    out: Path  # the run folder (only the chief writes into it)
    is_chief: bool
    n_workers: int
    model: dict  # ctrun.model_config, or the continued run's saved one
    continues: str  # "": new run; "resume": --resume; "restart": a multi-worker run rerun
    data: list[str]
    dataset: ctdata.CTDataset
    split: object  # MyDataLoader_train.Split
    notes: list[str]  # printed once training is about to start

    @property
    def select(self) -> str:
        """The checkpoint criterion: ``--select`` with ``auto`` resolved (ctselect.resolve)."""
        return ctselect.resolve(self.args.select, self.args.adv_weight)


def resolve_run(args: argparse.Namespace, is_chief: bool,
                n_workers: int) -> tuple[argparse.Namespace, Optional[dict], str]:
    """``(args, saved config or None, continues)``: a new run, ``--resume``, or the rerun of an
    interrupted multi-worker run (the same command, as a cluster manager reruns it; decided by
    the chief's run folder). A continued run takes every flag from its config.json (read once,
    here) except --epochs, --verbose and --strategy; a ``note:`` line names the other flags given
    with values the run does not use."""
    out = Path(args.out) if args.out else None
    if args.resume and out is None:
        raise ctio.CTDataError("--resume needs --out RUN_DIR")
    if args.resume:
        if not ctrun.has_state(out):
            raise ctio.CTDataError(f"--resume: {out} holds no training state to resume "
                                   f"(no {ctrun.STATE}/{ctrun.STATE_JSON})")
        continues = "resume"
    elif n_workers > 1 and is_chief and out is not None and (out / ctrun.CONFIG).is_file():
        continues = "restart"
    else:
        return args, None, ""
    ctio.remove_stale_temporaries([out, out / ctrun.STATE, out / ctrun.SNAPSHOTS])
    cfg = ctrun.read_run_config(out)
    defaults = vars(parse_args([]))
    keep = {k: getattr(args, k) for k in CONTINUE_FLAGS if getattr(args, k) is not None}
    ignored = ignored_flags(vars(args), defaults, cfg["train"])
    if ignored:
        print(f"note: {out} continues with the settings in its {ctrun.CONFIG}; ignoring "
              f"{', '.join(ignored)} (only --epochs, --verbose and --strategy apply)", flush=True)
    merged = {**defaults, **cfg["train"], **keep, "out": str(out),
              "resume": continues == "resume"}
    return argparse.Namespace(**merged), cfg, continues


CONTINUE_FLAGS = ("epochs", "verbose", "strategy")  # what a continued run takes from the command


def ignored_flags(given: dict, defaults: dict, saved: dict) -> list[str]:
    """The flags of ``given`` set away from their default (so given on the command line) whose
    value differs from the continued run's ``saved`` one, as ``--flag value`` strings."""
    def spelled(key: str, value) -> str:
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            return flag if value else f"--no-{flag[2:]}"  # only --augment can be given False
        return f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"

    skip = {*CONTINUE_FLAGS, "out", "resume"}
    return [spelled(k, v) for k, v in given.items()
            if k not in skip and v != defaults.get(k) and v != saved.get(k, defaults.get(k))]


def resolve_data(args) -> tuple[list[str], str]:
    """Data folders and a note; with no --data the built-in demo data (built when absent), its
    test patient held out through ``args.exclude`` like any --exclude."""
    if args.data:
        return list(args.data), ""
    import ctfixtures

    note = f"no --data: training on the built-in demo data in {DEMO_DIR}"
    if not (DEMO_DIR / "README.txt").is_file():
        print(f"{note} (creating it now)", flush=True)
        ctfixtures.make_demo(DEMO_DIR)
    args.exclude = [*(args.exclude or []), ctfixtures.DEMO_TEST_PATIENT]
    return [str(DEMO_DIR)], note


def prepare(argv=None) -> Plan:
    """Parse and check everything cheap: flags, cluster role, run folder, model, data, split."""
    args = parse_args(argv)
    is_chief, n_workers = worker_role(args.strategy)
    args, saved, continues = resolve_run(args, is_chief, n_workers)
    args = apply_recipe(args)
    check_args(args)
    args.precision = train_precision(args)
    args.mixed_precision = False  # folded into --precision (config.json has one key)
    if n_workers > 1 and args.time_limit:
        raise ctio.CTDataError("--time-limit is for single-machine runs: each worker would stop "
                               "on its own clock; use --epochs with several workers")
    given = list(args.data) if args.data else [str(DEMO_DIR)]
    out = Path(args.out or ctrun.RUNS_DIR / f"{args.preset}-{Path(given[0]).name}")
    args.out = str(out)
    check_paths(out if is_chief else None, args.cache_dir, given)  # workers write to a temp dir
    data, note = resolve_data(args)
    if not continues:  # fixed when the run starts (a continued run keeps its saved count)
        if args.l1_warmup_epochs is None:
            args.l1_warmup_epochs = int(args.l1_warmup * args.epochs)
        elif not 0 <= args.l1_warmup_epochs < args.epochs:
            raise ctio.CTDataError(f"--l1-warmup-epochs must be in [0, --epochs) (0: none), "
                                   f"got {args.l1_warmup_epochs} with --epochs {args.epochs}")
        if args.adv_weight == 0:
            args.l1_warmup_epochs = 0
    if is_chief and not continues:
        ctrun.check_new_run(out)
        if args.init_generator:
            import Mytest

            Mytest.check_weights_file(Path(args.init_generator))
    try:  # a continued run rebuilds exactly the saved model, even if the preset changed since
        model = saved["model"] if saved else ctrun.model_config(args.preset)
    except ValueError as e:
        raise ctio.CTDataError(f"--preset: {e}") from None
    multiple = 2 ** model["depth"]
    if args.patch % multiple:
        raise ctio.CTDataError(f"--patch {args.patch} is not divisible by 2^depth = {multiple} "
                               f"(preset {model['preset']})")

    import MyDataLoader_train as loader

    dataset = loader.find_training_data(data, args.layout, args.simulate_dose,
                                        exclude=args.exclude)
    split = loader.split_patients(dataset, args.val_patients)
    split.val = loader.pick_val_slices(split.val, args.val_slices)
    if args.simulated_share is not None:
        loader.split_by_kind(split.train, args.simulated_share)  # both kinds, or one line
    if args.steps_per_epoch == 0:  # one pass over the training slices (or their patches)
        per_slice = args.patches_per_slice if args.patch else 1
        args.steps_per_epoch = max(1, -(-len(split.train) * per_slice // args.batch))
    kernels = ctmachine.choose_cpu_kernels(model["preset"] == "small" and args.patch > 0,
                                      "small-preset patch training: 1.8x faster steps measured")
    return Plan(args=args, out=out, is_chief=is_chief, n_workers=n_workers, model=model,
                continues=continues, data=data, dataset=dataset, split=split,
                notes=[n for n in (note, kernels, warmup_note(args)) if n])


def warmup_note(args) -> str:
    n = args.l1_warmup_epochs
    return (f"L1 warm-up: epoch{'s 1-' if n > 1 else ' '}{n} of {args.epochs} without the "
            "adversarial term" if n else "")


def build_gan(plan: Plan, strategy, keras):
    """G, D and the CNCLGAN wrapper, compiled with two Adam optimizers, in ``strategy``."""
    import Mymodel

    args = plan.args
    lr = args.lr
    if args.lr_decay == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(args.lr, args.epochs * args.steps_per_epoch,
                                                    alpha=0.05)
    with strategy.scope():
        gan = Mymodel.CNCLGAN(*Mymodel.build_models(plan.model))
        try:
            gan.compile(g_optimizer=keras.optimizers.Adam(lr, args.beta_1, args.beta_2),
                        d_optimizer=keras.optimizers.Adam(lr, args.beta_1, args.beta_2),
                        lambda_l1=args.lambda_l1, adv_weight=args.adv_weight,
                        block_mean_weight=args.block_mean_weight,
                        spectrum_weight=args.spectrum_weight, ema_decay=args.ema_decay,
                        jit_compile=args.jit)
        except ValueError as e:
            raise ctio.CTDataError(f"--precision {args.precision}: {e}") from None
    return gan


def start_state(plan: Plan, gan, strategy, tf) -> dict:
    """RunState's state: fresh, or the continued run's (G, D and optimizers restored from state/
    on the chief, then, with several workers, taken by every worker from the chief)."""
    state = {"epoch": 0, "history": []}
    if plan.continues and plan.is_chief and ctrun.has_state(plan.out):
        state = ctrun.read_state(plan.out)
        restore_state(gan, plan.out / ctrun.STATE / state["weights"])
    elif plan.is_chief and plan.args.init_generator:
        init_generator(gan, Path(plan.args.init_generator), plan.model)
    if plan.n_workers > 1:
        state["epoch"] = sync_from_chief(gan, state["epoch"], plan.is_chief, strategy, tf)
    if plan.continues and state["epoch"]:
        what = ("resuming" if plan.continues == "resume"
                else "restarting the interrupted multi-worker run")
        print(f"{what} {plan.out} after epoch {state['epoch']}", flush=True)
    return state


def init_generator(gan, weights: Path, model: dict) -> None:
    """``--init-generator``: G (and its moving average) from ``weights``; CTDataError if they do
    not fit this run's generator."""
    import Mytest

    try:
        Mytest.load_weights_into(gan.generator, model, weights)
    except ctio.CTDataError as e:
        raise ctio.CTDataError(f"--init-generator: does not fit this run's generator (preset "
                               f"{model['preset']}): {e}") from None
    if gan.ema_generator is not None:
        gan.ema_generator.set_weights(gan.generator.get_weights())
    print(f"generator initialised from {weights}", flush=True)


def run_config(plan: Plan, tf, keras) -> dict:
    """config.json of a new run: the model, the normalisation, every flag, the data split (and
    the --init-generator file with its SHA-256)."""
    import Mytest

    split, train = plan.split, vars(plan.args)
    return {
        "model": plan.model,
        "normalization": {"hu_min": ctio.HU_MIN, "hu_max": ctio.HU_MAX,
                          "formula": "(clip(HU, hu_min, hu_max) - hu_min) / (hu_max - hu_min)"},
        "train": {k: v for k, v in train.items()
                  if k not in ("resume", "verbose", "strategy", "out", "mixed_precision")}
        | {"data": plan.data},
        "data": {"layout": plan.dataset.layout, "patients": plan.dataset.patients,
                 "train_patients": sorted({r.patient for r in split.train}),
                 "val_patients": sorted({r.patient for r in split.val}),
                 "excluded": plan.args.exclude or [], "split": split.how,
                 "train_slices": len(split.train), "val_slices": len(split.val)},
        "select": {"criterion": plan.select,
                   "texture_tolerance": ctselect.TEXTURE_TOL,
                   "texture_dose": ctselect.TEXTURE_DOSE,
                   "definition": "ctselect.py (generator_best: which epoch and why in "
                                 "state/state.json best_epoch, best_reason)"},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    } | ({"init_generator": {"path": str(Path(plan.args.init_generator).resolve()),
                             "sha256": Mytest.file_sha256(Path(plan.args.init_generator))}}
         if plan.args.init_generator else {})


def texture_probe(plan: Plan, gan):
    """For ``--select texture`` with validation slices: a function giving ctselect's texture
    figures of ``gan``'s generator now (the simulated pairs made once, here); else None."""
    if plan.select != "texture" or not plan.split.val:
        return None
    import ctdose
    import cttexture
    import Mytest

    slices = []
    for rec in plan.split.val[:ctselect.TEXTURE_SLICES]:
        fd, header = ctio.read_slice(rec.fd_path)
        if not slices or fd.shape == slices[0][0].shape:
            slices.append((fd, ctdose.pixel_size_mm(header, fd.shape, None),
                           cttexture.pixel_spacing_mm(header)))
    probe = ctselect.NoiseOnlyProbe(slices, seed=plan.args.seed)
    denoise = Mytest.Denoiser(gan.denoiser(), plan.model["depth"], batch=2)
    return lambda: probe.measure(denoise)


def make_datasets(plan: Plan, write_dir: Path, replicas: int, tf):
    """Training and validation tf.data pipelines (every training slice decoded into the slice
    cache first: a broken file stops here, in one line)."""
    import MyDataLoader_train as loader

    args, multiple = plan.args, 2 ** plan.model["depth"]
    cache_dir = args.cache_dir or write_dir / ctrun.CACHE
    print(f"slice cache: {cache_dir} (decoding what is not there yet)", flush=True)
    train_ds = loader.make_train_dataset(
        plan.split.train, patch=args.patch, batch=args.batch,
        patches_per_slice=args.patches_per_slice, simulate_dose=args.simulate_dose,
        seed=args.seed, augment_data=args.augment, skip_air=not args.keep_air,
        multiple=multiple, cache_dir=cache_dir, simulated_share=args.simulated_share)
    val_ds = None
    if plan.split.val:  # one whole slice per replica and step, never an empty batch
        val_ds = loader.make_val_dataset(plan.split.val, multiple=multiple, replicas=replicas,
                                         simulate_dose=args.simulate_dose, seed=args.seed)
    if plan.n_workers > 1:
        train_ds = shard_by_data(train_ds, tf)
        val_ds = None if val_ds is None else shard_by_data(val_ds, tf)
    return train_ds, val_ds


def run(plan: Plan) -> int:
    """Train: TensorFlow, strategy, model, state, config.json, data, fit. A new run that fails
    before its first epoch is saved leaves nothing behind."""
    args, out = plan.args, plan.out
    tf = ctio.import_tensorflow()
    import keras

    ctio.set_seed(args.seed)
    ctmachine.set_precision(args.precision)  # for every model built from here on
    strategy = make_strategy(args.strategy, tf)
    if args.batch % strategy.num_replicas_in_sync:
        raise ctio.CTDataError(f"--batch {args.batch} (the global batch) is not divisible by the "
                               f"{strategy.num_replicas_in_sync} replicas")
    if plan.n_workers > 1:  # the first collective waits, without a time limit, for every worker
        print(f"{'chief' if plan.is_chief else 'worker'} of {plan.n_workers} workers: training "
              "starts when all are up", flush=True)
    # Only the chief writes into RUN_DIR; other workers write to a folder that is removed.
    write_dir = out if plan.is_chief else Path(tempfile.mkdtemp(prefix="cncl-worker-"))
    write_dir.mkdir(parents=True, exist_ok=True)
    if not plan.is_chief:  # also when run() fails before fit
        atexit.register(shutil.rmtree, write_dir, ignore_errors=True)

    gan = build_gan(plan, strategy, keras)
    prepare_for_fit(gan, strategy, 2 ** plan.model["depth"], plan.n_workers, tf)
    state = start_state(plan, gan, strategy, tf)
    if state["epoch"] >= args.epochs:
        print(f"nothing to do: {state['epoch']} epochs done, --epochs {args.epochs}")
        return 0
    new_run = plan.is_chief and not ctrun.has_state(out)
    if new_run:
        ctrun.write_run_config(out, run_config(plan, tf, keras))
    elif plan.is_chief:  # a continued run: config.json says how many epochs it now has
        ctrun.record_epochs(out, args.epochs)
    try:
        train_ds, val_ds = make_datasets(plan, write_dir, strategy.num_replicas_in_sync, tf)
        for line in [*plan.notes, f"data: {len(plan.split.train)} training slices, "
                     f"{len(plan.split.val)} validation slices; {plan.split.how}"]:
            print(line, flush=True)
        trainable = sum(math.prod(v.shape) for v in gan.generator.trainable_variables)
        print(f"model: preset {plan.model['preset']}, generator {trainable:,} trainable "
              f"parameters; run folder {out}", flush=True)
        callbacks = make_callbacks(write_dir, gan, state, val_ds, keras, tf,
                                   time_limit=args.time_limit,
                                   snapshot_every=args.snapshot_every,
                                   select=plan.select,
                                   probe=texture_probe(plan, gan),
                                   l1_warmup_epochs=args.l1_warmup_epochs)
        gan.fit(train_ds, epochs=args.epochs, initial_epoch=state["epoch"],
                steps_per_epoch=args.steps_per_epoch, validation_data=val_ds,
                callbacks=callbacks, verbose=args.verbose, shuffle=False)
        if callbacks[0].bad:  # NonFinite: nothing of the bad epoch was saved
            raise ctio.CTDataError(nonfinite_message(callbacks[0].bad, state, out))
    except BaseException as e:
        if new_run:
            ctrun.discard_unstarted_run(out)
        if isinstance(e, tf.errors.OpError):
            raise_clean(e, plan.n_workers, tf)
        raise
    finally:
        if not plan.is_chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    if plan.is_chief:
        best = state.get("best_val_psnr")
        print(f"done: {state['epoch']} epochs; generator weights in {out}"
              + (f" (generator_best: epoch {state['best_epoch']}, val PSNR {best:.2f} dB; "
                 f"{ctrun.best_reason(state)})" if best else ""))
    return 0


def raise_clean(e, n_workers: int, tf) -> None:
    """Re-raise a TensorFlow OpError from fit as the error a user can act on.

    A CTDataError raised while decoding inside tf.data (in fit, or for the first validation slice
    taken by make_callbacks) arrives wrapped in an OpError with TF's node names and a Python
    traceback: keep the CTDataError's own line. A lost worker says what to do."""
    msg = " ".join(e.message.split())
    if "CTDataError:" in msg:
        msg = msg.split("CTDataError:")[-1]
        for tail in (" Traceback (most recent call last)", " [[", " {{"):
            msg = msg.split(tail)[0]
        raise ctio.CTDataError(msg.strip()) from None
    if n_workers > 1 and isinstance(e, (tf.errors.UnavailableError, tf.errors.CancelledError)):
        raise RuntimeError(f"lost contact with another worker ({type(e).__name__}); run the "
                           "same command on every worker again to continue from the last "
                           "finished epoch") from None


def restore_state(gan, weights: Path) -> None:
    """Load G, D and both optimizers' state saved by RunState."""
    import numpy as np

    gan(np.zeros((1, 2 ** 6, 2 ** 6, 1), np.float32))  # builds the wrapper (G, D are functional)
    try:  # compile() has built both optimizers, so their variables exist to be loaded
        gan.load_weights(str(weights))
    except Exception as e:
        raise ctio.CTDataError(f"{weights}: cannot restore the training state ({e})") from None


def main(argv=None) -> int:
    return run(prepare(argv))


if __name__ == "__main__":
    ctio.run_cli(main)
