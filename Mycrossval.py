"""Cross-validate a training recipe over every paired slice: K leave-one-pair-out folds.

Fold design (issue 25). The paired slices of ``--data`` (all folders together, sorted by patient
and position) are numbered 1..K; fold k tests pair k and nothing else, so every pair is tested in
exactly one fold. Fold k trains Mytrain.py on all other pairs except the validation patient's
(``--val-patient``, default the patient with the fewest pairs: validation then costs the fewest
training pairs) and validates on that patient; when pair k belongs to the validation patient
itself, the fold validates on nothing (``--val-patients none``) and trains on the other patients.
A fold therefore never validates on its test slice, and its test slice is never trained on
(``--exclude PATIENT:SLICE``). Validation only monitors: each fold scores the generator of its
last epoch (``--weights latest``, as ``make train-mayo``) unless ``--weights best`` (the epoch
Mytrain's ``--select`` chose; the last epoch in a fold without validation) is asked for.
On the 7 real Mayo pairs (1 L067, 6 L506): fold 1 tests L067 and trains on the six L506 pairs
without validation; folds 2-7 test one L506 pair each (slices 0, 40, ..., 200), train on the other
five and validate on L067.

A ``--data`` folder with full dose only (with ``--simulate-dose``; ``--simulated-share`` sets its
share of the batches) is trained on in every fold and never tested or validated on. The folds do
not know that two names are one patient: the 1 mm full-dose series ``L067_full_1mm`` is the
patient of the L067 pair, so with it fold 1 would train on the anatomy it tests; leave such a fold
out (``--folds 2 3 4 5 6 7``).

Each fold composes the CLIs (subprocesses): Mytrain.py -> OUT/fold_k/run, Mytest.py
``--precision float32`` -> OUT/fold_k/test, Myevaluation.py --pred OUT/fold_k/test
(-> OUT/fold_k/test/metrics.json); their output goes to OUT/fold_k/log.txt. A fold whose
metrics.json exists is skipped (resume: run the same command again); an unfinished fold is
redone from scratch. Flags this CLI does not know are passed to Mytrain.py (the recipe, e.g.
``--recipe cpu --epochs 10 --steps-per-epoch 100 --adv-weight 0``) and recorded in
OUT/crossval.json; a second call with other flags or data refuses to mix them into the same OUT.
``{fold}`` in such a flag becomes the fold number, e.g. ``--init-generator
runs/cv-l1/fold_{fold}/run/generator_latest.weights.h5``: each fold fine-tunes the generator
another cross-validation trained without that fold's test pair.

The table (printed and written to OUT/crossval.md): per fold the test pair, PSNR / SSIM / RMSE
(Myevaluation's redcnn protocol), the noise-texture ratios to full dose (ROI noise std and NPS
mean frequency, where flat ROIs exist) and the soft-tissue CT-number bias of the model and of
the LDCT input (where metrics.json has Myevaluation's per-band ``bias``: the input's own offset
from full dose differs per slice, -1.4 to +0.7 HU on the 7 real pairs, and a denoiser keeps
most of it) and their difference, "model - input": the shift the model adds itself; then mean ±
sample sd (ddof=1) over the folds that have the figure. "-" marks a figure a fold does not have.
A line under it counts the fold runs within ``BIAS_TOL_HU`` (issue 25's 1 HU): the model's bias,
the input's own offset and model - input (``--compare``: over every fold run of every OUT).

``--compare OUT [OUT ...]`` trains nothing: it sets finished cross-validations of the same folds
side by side (e.g. one recipe with several ``--seed`` values): one row per OUT with its mean ± sd
over folds, then per fold the input's soft-tissue bias, the model's and "model - input" of every OUT
and their spread (sample sd over the OUTs, the same for both: the input is the same), which says how
much a rerun moves a fold's CT numbers.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import ctdata
import ctio
import ctrun

REPO = Path(__file__).resolve().parent
STATE = "crossval.json"
TABLE = "crossval.md"
PROTOCOL = "redcnn"
# Mytrain flags that the fold design sets; passing them through would break the design.
MANAGED = ("--data", "--out", "--exclude", "--val-patients", "--cache-dir", "--resume")
Runner = Callable[[Sequence[str], Path], int]  # (command, log file) -> exit status


@dataclass(frozen=True)
class Fold:
    """One fold: the test pair and the validation patient ('none' for no validation)."""

    k: int
    patient: str
    slice_id: str
    data: Path  # the --data folder that holds the test pair
    val: str

    @property
    def spec(self) -> str:
        return f"{self.patient}:{self.slice_id}"


@dataclass
class Plan:
    """Everything run() needs, checked before anything is written."""

    data: list[Path]
    out: Path
    folds: list[Fold]
    todo: list[int]
    train_flags: list[str]
    weights: str
    settings: dict = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    ap = ctio.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Unknown flags are passed to Mytrain.py.",
        epilog=" ".join(__doc__.split("\n\n")[1].split()),
        formatter_class=ctio.HelpFormatter, allow_abbrev=False)
    ap.add_argument("--data", nargs="+", default=None, metavar="PATH",
                    help="paired dataset folder(s), any layout the loaders read (required "
                         "unless --compare)")
    ap.add_argument("--out", default=None,
                    help="cross-validation folder (OUT/fold_k/ per fold, OUT/crossval.md) "
                         "(required unless --compare)")
    ap.add_argument("--val-patient", default=None, metavar="P",
                    help="validation patient of every fold that does not test it (default: "
                         "the patient with the fewest pairs)")
    ap.add_argument("--folds", nargs="+", type=int, default=None, metavar="K",
                    help="run only these folds (1-based; default all); the table shows every "
                         "finished fold")
    ap.add_argument("--weights", choices=("latest", "best"), default="latest",
                    help="generator each fold scores: last epoch or generator_best (the epoch "
                         "Mytrain --select chose; the last epoch without validation)")
    ap.add_argument("--table-only", action="store_true",
                    help="train nothing: print the table of the finished folds")
    ap.add_argument("--compare", nargs="+", default=None, metavar="OUT",
                    help="train nothing: compare finished cross-validation folders of the same "
                         "folds (e.g. seeds): their means and every fold's bias spread")
    return ap


def design_folds(dataset_by_root: dict[Path, ctdata.CTDataset],
                 val_patient: Optional[str]) -> list[Fold]:
    """Leave-one-pair-out folds (see the module docstring); CTDataError if fewer than 2 pairs."""
    pairs = sorted(((r.patient, r.position, r.slice_id, root)
                    for root, ds in dataset_by_root.items() for r in ds.records),
                   key=lambda p: (p[0], p[1], p[2]))
    if len(pairs) < 2:
        raise ctio.CTDataError(f"{len(pairs)} paired slice(s) in --data: need at least 2 to "
                               "cross-validate")
    counts: dict[str, int] = {}
    for p in pairs:
        counts[p[0]] = counts.get(p[0], 0) + 1
    if val_patient is None:
        val_patient = min(sorted(counts), key=lambda p: counts[p]) if len(counts) > 1 else "none"
    elif val_patient != "none" and val_patient not in counts:
        raise ctio.CTDataError(f"--val-patient {val_patient}: not in the data "
                               f"({', '.join(sorted(counts))})")
    return [Fold(k, patient, sid, root, "none" if patient == val_patient else val_patient)
            for k, (patient, _, sid, root) in enumerate(pairs, 1)]


def check_out(out: Path, data: list[Path], settings: dict) -> None:
    """OUT must not touch the input data and must be empty, absent, or an earlier call's own
    folder made with the same settings; CTDataError otherwise."""
    for d in data:
        if ctrun.inside(out, d) or ctrun.inside(d, out):
            raise ctio.CTDataError(f"--out {out} and the input folder {d} overlap; outputs are "
                                   "never written into the input data")
    if out.exists() and not out.is_dir():
        raise ctio.CTDataError(f"--out {out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    state = out / STATE
    if not state.is_file():
        raise ctio.CTDataError(f"--out {out}: a non-empty folder that is not a cross-validation "
                               f"folder (no {STATE}); choose another --out")
    old = ctio.read_json(state, "cross-validation state")
    if old != settings:
        diff = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
        raise ctio.CTDataError(f"--out {out}: made with other settings ({', '.join(diff)}); "
                               "choose another --out to compare recipes")


def prepare(args: argparse.Namespace, train_flags: list[str]) -> Plan:
    """Check every argument and design the folds; raises CTDataError, writes nothing."""
    bad = [f for f in train_flags if f.split("=")[0] in MANAGED]
    if bad:
        raise ctio.CTDataError(f"{bad[0]}: set by the fold design, cannot be passed to Mytrain.py")
    import Mytrain  # no TensorFlow at import: a typo in the recipe fails here, not in fold 1

    recipe = Mytrain.parse_args(train_flags)
    data = [Path(d).resolve() for d in args.data]
    for d in data:
        if not d.is_dir():
            raise ctio.CTDataError(f"--data {d}: folder not found")
    import MyDataLoader_train as loader

    found = loader.discover_all([str(d) for d in data])  # as Mytrain discovers them
    loader.check_trainable(found, recipe.simulate_dose)  # low dose alone; full dose alone
    by_root = {d: ds for d, ds in zip(data, found) if ds.paired}  # needs --simulate-dose
    if not by_root:
        raise ctio.CTDataError("--data: no paired dataset (low dose and full dose) to test on")
    folds = design_folds(by_root, args.val_patient)
    todo = args.folds or [f.k for f in folds]
    wrong = [k for k in todo if not 1 <= k <= len(folds)]
    if wrong:
        raise ctio.CTDataError(f"--folds {wrong[0]}: need 1..{len(folds)}")
    out = Path(args.out).resolve()
    settings = {"data": [str(d) for d in data], "train_flags": train_flags,
                "weights": args.weights, "folds": [f.spec for f in folds],
                "val": [f.val for f in folds]}
    check_out(out, data, settings)
    return Plan(data, out, folds, [] if args.table_only else sorted(set(todo)), train_flags,
                args.weights, settings)


def fold_commands(plan: Plan, fold: Fold) -> list[list[str]]:
    """Mytrain, Mytest (float32) and Myevaluation command lines of ``fold``."""
    py, d = sys.executable, plan.out / f"fold_{fold.k}"
    run = d / "run"
    train = [py, str(REPO / "Mytrain.py"), "--data", *map(str, plan.data), "--out", str(run),
             "--exclude", fold.spec, "--val-patients", fold.val,
             "--cache-dir", str(plan.out / "cache"),
             *(flag.replace("{fold}", str(fold.k)) for flag in plan.train_flags)]
    test = [py, str(REPO / "Mytest.py"), "--data", str(fold.data), "--slices", fold.spec,
            "--run", str(run), "--weights", str(run / f"generator_{plan.weights}.weights.h5"),
            "--out", str(d / "test"), "--no-figures", "--precision", "float32"]
    evaluate = [py, str(REPO / "Myevaluation.py"), "--pred", str(d / "test")]
    return [train, test, evaluate]


def metrics_path(out: Path, k: int) -> Path:
    return out / f"fold_{k}" / "test" / "metrics.json"


def subprocess_runner(cmd: Sequence[str], log: Path) -> int:
    """Run ``cmd`` from the repository, its stdout and stderr appended to ``log``."""
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        return subprocess.run(list(cmd), stdout=fh, stderr=subprocess.STDOUT, cwd=REPO).returncode


def run(plan: Plan, runner: Runner = subprocess_runner) -> None:
    """Run the pending folds, skipping finished ones; CTDataError when a step fails."""
    plan.out.mkdir(parents=True, exist_ok=True)
    state = plan.out / STATE
    if not state.is_file():
        state.write_text(json.dumps(plan.settings, indent=1) + "\n")
    for fold in (f for f in plan.folds if f.k in plan.todo):
        if metrics_path(plan.out, fold.k).is_file():
            print(f"fold {fold.k} ({fold.spec}): done, skipped", flush=True)
            continue
        d = plan.out / f"fold_{fold.k}"
        shutil.rmtree(d, ignore_errors=True)  # an unfinished fold of ours: redo it
        d.mkdir()
        print(f"fold {fold.k}/{len(plan.folds)}: test {fold.spec}, validate {fold.val} "
              f"(log {d / 'log.txt'})", flush=True)
        for cmd in fold_commands(plan, fold):
            code = runner(cmd, d / "log.txt")
            if code != 0:
                raise ctio.CTDataError(f"fold {fold.k}: {Path(cmd[1]).name} exited {code} "
                                       f"(see {d / 'log.txt'})")


def collect(plan: Plan) -> list[dict]:
    """The table rows of the finished folds."""
    rows = [fold_row(f, metrics_path(plan.out, f.k)) for f in plan.folds]
    return [r for r in rows if r is not None]


# --- The table --------------------------------------------------------------------------------
COLUMNS = (("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 3), ("rmse", "RMSE (HU)", 2),
           ("ldct_psnr", "LDCT PSNR", 2), ("noise_ratio", "ROI noise / FD", 2),
           ("fav_ratio", "NPS f_av / FD", 2), ("bias_soft", "soft-tissue bias (HU)", 2),
           ("ldct_bias_soft", "LDCT soft-tissue bias (HU)", 2),
           ("shift_soft", "model − input (HU)", 2))


def _get(d: dict, *keys) -> Optional[float]:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, (int, float)) else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def fold_row(fold: Fold, path: Path) -> Optional[dict]:
    """The table row of a finished fold (None when its metrics.json is absent)."""
    if not path.is_file():
        return None
    o = ctio.read_json(path, "fold metrics").get("overall", {})
    cncl, fd = o.get("cncl", {}), o.get("fd", {})
    row = {"k": fold.k, "test": fold.spec, "val": fold.val,
           **{m: _get(cncl, PROTOCOL, m, "mean") for m in ("psnr", "ssim", "rmse")},
           "ldct_psnr": _get(o, "ldct", PROTOCOL, "psnr", "mean"),
           "noise_ratio": _ratio(_get(cncl, "noise", "noise_std", "mean"),
                                 _get(fd, "noise", "noise_std", "mean")),
           "fav_ratio": _ratio(_get(cncl, "noise", "nps_mean_freq", "mean"),
                               _get(fd, "noise", "nps_mean_freq", "mean")),
           "bias_soft": _get(cncl, "bias", "soft", "mean"),
           "ldct_bias_soft": _get(o, "ldct", "bias", "soft", "mean")}  # the input's own offset
    row["shift_soft"] = (None if None in (row["bias_soft"], row["ldct_bias_soft"])
                         else row["bias_soft"] - row["ldct_bias_soft"])  # what the model adds
    return row


def mean_sd(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float], int]:
    """Mean and sample sd (ddof=1) of the values that are not None, and their count."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None, 0
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v)


def _fmt(x: Optional[float], nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def table(rows: list[dict], k_total: int) -> str:
    """Markdown: one row per finished fold, then mean ± sd over folds (n = folds with it)."""
    head = "| fold | test | val | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['k']} | {r['test']} | {r['val']} | "
                     + " | ".join(_fmt(r[c], nd) for c, _, nd in COLUMNS) + " |")
    lines.append(f"| mean ± sd | {len(rows)} of {k_total} folds | | {summary_cells(rows)} |")
    return "\n".join(lines) + f"\n\n{tolerance_line(rows)}\n\n{FOOTNOTE}"


BIAS_TOL_HU = 1.0  # issue 25's acceptance: |soft-tissue bias| <= 1 HU on every fold and rerun


def tolerance_line(rows: list[dict]) -> str:
    """How many of ``rows`` (fold runs) keep the soft-tissue CT number within BIAS_TOL_HU: the
    model against full dose, the LDCT input (its own offset, once per fold) and model − input."""
    def count(key: str, rs) -> str:
        v = [r[key] for r in rs if r.get(key) is not None]
        return f"{sum(abs(x) <= BIAS_TOL_HU for x in v)} of {len(v)}"

    folds = list({r["k"]: r for r in rows}.values())
    return (f"|soft-tissue bias| <= {BIAS_TOL_HU:g} HU: model {count('bias_soft', rows)} fold "
            f"runs, LDCT input {count('ldct_bias_soft', folds)} folds; |model − input| <= "
            f"{BIAS_TOL_HU:g} HU: {count('shift_soft', rows)} fold runs")


FOOTNOTE = (f"PSNR / SSIM / RMSE: Myevaluation protocol {PROTOCOL}; sd: sample sd over folds "
            "(ddof=1); '-': not measured in that fold; model − input: soft-tissue bias minus the "
            "LDCT input's")


def summary_cells(rows: list[dict]) -> str:
    """``mean ± sd`` over ``rows`` of every column, ``(n=...)`` where not every row has it."""
    cells = []
    for c, _, nd in COLUMNS:
        m, s, n = mean_sd([r[c] for r in rows])
        cells.append("-" if m is None else f"{m:.{nd}f} ± {_fmt(s, nd)}"
                     + ("" if n == len(rows) else f" (n={n})"))
    return " | ".join(cells)


# --- Several cross-validations of the same folds (--compare) ----------------------------------
def saved_folds(out: Path) -> list[Fold]:
    """The folds recorded in ``out``'s crossval.json; CTDataError if it is not one."""
    if not (out / STATE).is_file():
        raise ctio.CTDataError(f"--compare {out}: not a cross-validation folder (no {STATE})")
    settings = ctio.read_json(out / STATE, "cross-validation state")
    try:
        return [Fold(k, *spec.split(":", 1), Path(), val)
                for k, (spec, val) in enumerate(zip(settings["folds"], settings["val"]), 1)]
    except (KeyError, TypeError, ValueError):
        raise ctio.CTDataError(f"{out / STATE}: no fold list; rerun that cross-validation "
                               "with this Mycrossval.py") from None


def compare(outs: list[Path]) -> str:
    """Markdown: one row per cross-validation folder (mean ± sd over its finished folds), then
    per fold the soft-tissue bias and model − input of each folder with their sample sd over the
    folders (see the module docstring). CTDataError if the folders' folds differ."""
    folds = saved_folds(outs[0])
    for o in outs[1:]:
        if [(f.spec, f.val) for f in saved_folds(o)] != [(f.spec, f.val) for f in folds]:
            raise ctio.CTDataError(f"--compare {o}: other folds than {outs[0]}; compare "
                                   "cross-validations of the same pairs")
    rows = {o: {f.k: fold_row(f, metrics_path(o, f.k)) for f in folds} for o in outs}
    head = "| cross-validation | folds | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|---|---|" + "---|" * len(COLUMNS)]
    for o in outs:
        done = [r for r in rows[o].values() if r is not None]
        lines.append(f"| {o.name} | {len(done)} of {len(folds)} | {summary_cells(done)} |")
    lines += ["", "Per fold over the cross-validations (" + ", ".join(o.name for o in outs)
              + "): each one's figure, then their sample sd", "",
              "| fold | test | LDCT soft-tissue bias (HU) | soft-tissue bias (HU) | "
              "model − input (HU) | sd over runs (HU) |", "|---|---|---|---|---|---|"]
    for f in folds:
        runs = [rows[o][f.k] or {} for o in outs]  # {}: a fold that OUT has not finished
        bias, shift = ([r.get(key) for r in runs] for key in ("bias_soft", "shift_soft"))
        ldct = _fmt(next((r["ldct_bias_soft"] for r in runs if r), None), 2)
        lines.append(f"| {f.k} | {f.spec} | {ldct} | " + " / ".join(_fmt(x, 2) for x in bias)
                     + " | " + " / ".join(_fmt(x, 2) for x in shift)
                     + f" | {_fmt(mean_sd(bias)[1], 2)} |")
    done = [r for o in outs for r in rows[o].values() if r is not None]
    return "\n".join(lines) + f"\n\n{tolerance_line(done)}\n\n{FOOTNOTE}"


def main(argv: Optional[Sequence[str]] = None, runner: Runner = subprocess_runner) -> int:
    args, train_flags = build_parser().parse_known_args(argv)
    if args.compare:
        given = [f for f, v in (("--data", args.data), ("--out", args.out)) if v] + train_flags
        if given:
            raise ctio.CTDataError(f"--compare trains nothing: {given[0]} does not go with it")
        print(compare([Path(o).resolve() for o in args.compare]))
        return 0
    missing = [f for f, v in (("--data", args.data), ("--out", args.out)) if not v]
    if missing:
        raise ctio.CTDataError(f"the following arguments are required: {', '.join(missing)} "
                               "(see --help)")
    plan = prepare(args, train_flags)
    if plan.todo:
        run(plan, runner)
    text = table(collect(plan), len(plan.folds))
    if plan.out.is_dir():
        (plan.out / TABLE).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    ctio.run_cli(main)
