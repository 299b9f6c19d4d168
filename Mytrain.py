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
import csv
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import ctio

REPO = Path(__file__).resolve().parent
DEMO_DIR = REPO / "data" / "demo"  # where the built-in demo dataset is created
CONFIG_VERSION = 1
STRATEGIES = ("auto", "default", "mirrored", "multiworker")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Train CNCL on paired (or simulated) low-dose / full-dose CT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", nargs="+", default=None,
                    help="dataset folder(s), any layout the loaders read; default: the built-in "
                         f"demo data in {DEMO_DIR.relative_to(REPO)} (created if absent)")
    ap.add_argument("--layout", choices=ctio.LAYOUTS, default=None,
                    help="override layout auto-detection")
    ap.add_argument("--simulate-dose", type=float, default=None,
                    help="simulate this dose fraction for full-dose-only slices")
    ap.add_argument("--out", default=None,
                    help="run folder; default runs/<preset>-<data name>")
    ap.add_argument("--preset", default="small", help="model preset: small or paper")
    ap.add_argument("--epochs", type=int, default=10, help="total number of epochs")
    ap.add_argument("--steps-per-epoch", type=int, default=100, help="batches per epoch")
    ap.add_argument("--batch", type=int, default=16, help="global batch size (patches)")
    ap.add_argument("--patch", type=int, default=64,
                    help="patch size; 0 trains on whole slices")
    ap.add_argument("--patches-per-slice", type=int, default=8,
                    help="random patches cut from each decoded slice")
    ap.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (both networks)")
    ap.add_argument("--lr-decay", choices=("none", "cosine"), default="none",
                    help="learning-rate schedule over the whole run")
    ap.add_argument("--lambda-l1", type=float, default=100.0,
                    help="weight of L1(content) + L1(noise) against the adversarial loss")
    ap.add_argument("--adv-weight", type=float, default=1.0,
                    help="weight of the adversarial term (0: L1 only, no discriminator updates)")
    ap.add_argument("--val-patients", nargs="+", default=None,
                    help="validation patients; default the last patient, 'none' for none")
    ap.add_argument("--val-slices", type=int, default=8,
                    help="at most this many whole validation slices (evenly spaced)")
    ap.add_argument("--no-augment", action="store_true", help="no flips / rotations")
    ap.add_argument("--keep-air", action="store_true",
                    help="do not skip air-only patches")
    ap.add_argument("--seed", type=int, default=0, help="seed for Python, NumPy and TF")
    ap.add_argument("--mixed-precision", action="store_true",
                    help="mixed_float16 compute (GPU); losses scaled by LossScaleOptimizer")
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
    for name in ("epochs", "steps_per_epoch", "batch", "patches_per_slice", "val_slices"):
        if getattr(args, name) < 1:
            raise ctio.CTDataError(f"--{name.replace('_', '-')} must be at least 1")
    if args.patch < 0:
        raise ctio.CTDataError("--patch must be 0 (whole slices) or positive")
    if args.lr <= 0 or args.lambda_l1 < 0 or args.adv_weight < 0:
        raise ctio.CTDataError("--lr must be positive; --lambda-l1 and --adv-weight >= 0")
    if args.simulate_dose is not None and not 0 < args.simulate_dose < 1:
        raise ctio.CTDataError(f"--simulate-dose must be in (0, 1), got {args.simulate_dose}")


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
    try:
        cfg = json.loads(path.read_text())
        cfg["model"]["base_filters"], cfg["model"]["depth"]  # noqa: B018 (presence check)
    except FileNotFoundError:
        raise ctio.CTDataError(f"{path}: no config.json in the run folder") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ctio.CTDataError(f"{path}: not a valid run configuration ({e})") from None
    return cfg


def write_json(path: Path, obj) -> None:
    with ctio.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


# --- Distribution -------------------------------------------------------------------------------
def worker_role() -> tuple[bool, int]:
    """(is_chief, number of workers) from TF_CONFIG; a malformed TF_CONFIG is a CTDataError."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return True, 1
    try:
        cfg = json.loads(raw)
        cluster, task = cfg["cluster"], cfg["task"]
        ttype, index = task["type"], int(task["index"])
        workers = list(cluster.get("worker", [])) + list(cluster.get("chief", []))
        for addr in workers:
            host, _, port = str(addr).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"bad address '{addr}' (want host:port)")
        if ttype not in cluster or index >= len(cluster[ttype]):
            raise ValueError(f"task {ttype}:{index} is not in the cluster")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ctio.CTDataError(f"TF_CONFIG is malformed: {e}") from None
    chief = ttype == "chief" or (ttype == "worker" and index == 0 and "chief" not in cluster)
    return chief, len(workers)


def make_strategy(name: str, tf):
    if name == "auto":
        if os.environ.get("TF_CONFIG"):
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


# --- Callbacks ----------------------------------------------------------------------------------
def make_callbacks(run_dir: Path, write_dir: Path, gan, state: dict, val_ds, keras, tf):
    """The run's own checkpointing (atomic, resumable) and TensorBoard panels."""

    class RunState(keras.callbacks.Callback):
        """After each epoch: latest/best generator, full state, history.csv; state.json last."""

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            row = {"epoch": epoch + 1, **logs}
            state["history"].append(row)
            gen = gan.generator
            save_weights(gen, write_dir / "generator_latest.weights.h5")
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
            self.ld, self.fd = batch
            self.writer = tf.summary.create_file_writer(str(write_dir / "tensorboard" / "images"))

        def on_epoch_end(self, epoch, logs=None):
            out = gan(self.ld, training=False)
            lo, hi = ctio.EVAL_WINDOW
            win = [(ctio.denormalize(x) - lo) / (hi - lo) for x in (self.ld, out, self.fd)]
            panel = tf.clip_by_value(tf.concat(win, axis=2), 0.0, 1.0)
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
    is_chief, n_workers = worker_role()
    if args.resume:
        if args.out is None:
            raise ctio.CTDataError("--resume needs --out RUN_DIR")
        out = Path(args.out)
        check_run_dir(out, resume=True)
        cfg = load_config(out)
        epochs = args.epochs
        args = argparse.Namespace(**{**cfg["train"], "epochs": epochs, "resume": True,
                                     "verbose": args.verbose, "strategy": args.strategy,
                                     "out": str(out)})
    check_args(args)
    data, exclude, note = resolve_data(args)
    if args.out is None:
        args.out = str(REPO / "runs" / f"{args.preset}-{Path(data[0]).name}")
    out = Path(args.out)
    if not args.resume and is_chief:
        check_run_dir(out, resume=False)

    import MyDataLoader_train as loader

    dataset = loader.find_training_data(data, args.layout, args.simulate_dose)
    if exclude:
        dataset = dataset.for_patients([p for p in dataset.patients if p not in exclude])
    split = loader.split_patients(dataset, args.val_patients)

    tf = ctio.import_tensorflow()
    import keras

    import Mymodel

    try:
        model_cfg = Mymodel.model_config(args.preset)
    except ValueError as e:
        raise ctio.CTDataError(f"--preset: {e}") from None
    multiple = 2 ** model_cfg["depth"]
    if args.patch % multiple:
        raise ctio.CTDataError(f"--patch {args.patch} is not divisible by 2^depth = {multiple} "
                               f"(preset {args.preset})")
    ctio.set_seed(args.seed)
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = make_strategy(args.strategy, tf)

    # Only the chief writes into RUN_DIR; other workers write to a folder that is removed.
    write_dir = out if is_chief else Path(tempfile.mkdtemp(prefix="cncl-worker-"))
    write_dir.mkdir(parents=True, exist_ok=True)
    train_ds = loader.make_train_dataset(
        split.train, patch=args.patch, batch=args.batch,
        patches_per_slice=args.patches_per_slice, simulate_dose=args.simulate_dose,
        seed=args.seed, augment_data=not args.no_augment, skip_air=not args.keep_air)
    val_ds = None
    if split.val:
        val_ds = loader.make_val_dataset(split.val, multiple=multiple, max_slices=args.val_slices,
                                         simulate_dose=args.simulate_dose, seed=args.seed)
    if n_workers > 1:
        opts = tf.data.Options()
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        train_ds = train_ds.with_options(opts)
        if val_ds is not None:
            val_ds = val_ds.with_options(opts)

    total_steps = args.epochs * args.steps_per_epoch
    with strategy.scope():
        generator, discriminator = Mymodel.build_models(model_cfg)
        gan = Mymodel.CNCLGAN(generator, discriminator)

        def lr():
            if args.lr_decay == "cosine":
                return keras.optimizers.schedules.CosineDecay(args.lr, total_steps, alpha=0.05)
            return args.lr

        gan.compile(g_optimizer=keras.optimizers.Adam(lr(), beta_1=0.5),
                    d_optimizer=keras.optimizers.Adam(lr(), beta_1=0.5),
                    lambda_l1=args.lambda_l1, adv_weight=args.adv_weight)

    state = {"epoch": 0, "history": []}
    if args.resume:
        state = json.loads((out / "state" / "state.json").read_text())
        restore_state(gan, out / "state" / state["weights"])
        print(f"resuming {out} after epoch {state['epoch']}", flush=True)
        if state["epoch"] >= args.epochs:
            print(f"nothing to do: {state['epoch']} epochs done, --epochs {args.epochs}")
            return 0
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

    if note:
        print(note)
    print(f"data: {len(split.train)} training slices, {len(split.val)} validation slices; "
          f"{split.how}", flush=True)
    print(f"model: preset {args.preset}, generator {generator.count_params():,} parameters; "
          f"run folder {out}", flush=True)
    callbacks = make_callbacks(out, write_dir, gan, state, val_ds, keras, tf)
    try:
        gan.fit(train_ds, epochs=args.epochs, initial_epoch=state["epoch"],
                steps_per_epoch=args.steps_per_epoch, validation_data=val_ds,
                callbacks=callbacks, verbose=args.verbose, shuffle=False)
    except tf.errors.OpError as e:
        # A CTDataError raised while decoding inside tf.data arrives wrapped in an OpError.
        msg = " ".join(e.message.split())
        if "CTDataError" in msg:
            raise ctio.CTDataError(msg.split("CTDataError:")[-1].strip()) from None
        raise
    finally:
        if not is_chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    if is_chief:
        best = state.get("best_val_psnr")
        print(f"done: {state['epoch']} epochs; generator weights in {out}"
              + (f" (best val PSNR {best:.2f} dB at epoch {state['best_epoch']})" if best else ""))
    return 0


def restore_state(gan, weights: Path) -> None:
    """Load G, D and both optimizers' state saved by RunState."""
    import numpy as np

    gan(np.zeros((1, 2 ** 6, 2 ** 6, 1), np.float32))  # builds the wrapper (G, D are functional)
    try:  # compile() has built both optimizers, so their variables exist to be loaded
        gan.load_weights(str(weights))
    except Exception as e:
        raise ctio.CTDataError(f"{weights}: cannot restore the training state ({e})") from None


if __name__ == "__main__":
    sys.exit(ctio.run_cli(main))
