"""Training data: find and pair QD/FD slices, normalise, cut patches, augment -> tf.data.

Pipeline (``make_train_dataset``)::

    slice index, a new permutation of all slices every pass -> decoded pair [H, W, 1], read
      memory-mapped from the on-disk slice cache (decoded in parallel by numpy and cached on
      first use) -> K random patches per slice (air-only patches skipped) -> same flip /
      90-degree rotation on LD and FD -> unbatch -> shuffle patches -> batch -> prefetch

Elements are ``(ld, fd)``, float32 ``[P, P, 1]`` normalised with ``ctio.normalize`` (P = 0: whole
slices). Full-dose-only data can be trained on with ``simulate_dose`` (quarter dose simulated per
slice by ``ctdose``, deterministically, once, then cached). RAM does not grow with the number
of slices: decoded slices live in files (``SliceCache``), shuffling works on indices.

As a script it checks a dataset before training::

    python MyDataLoader_train.py --data PATH [--layout ...] [--simulate-dose 0.25] [--recipe cpu]
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import ctdata
import ctio
import ctrun

PATCH_SIZE = 64  # make_train_dataset's default only; Mytrain.py passes its recipe's --patch
PATCHES_PER_SLICE = 8  # several patches per decoded slice amortise decoding
AIR_HU = -900.0  # below this a pixel is air; patches of almost only air teach nothing
VAL_FRACTION = 0.2  # share of slices held out when there is a single patient


@dataclass
class Split:
    """Training and validation records and a sentence saying how they were chosen."""

    train: list
    val: list
    how: str


def find_training_data(paths: Sequence[str], layout: Optional[str] = None,
                       simulate_dose: Optional[float] = None,
                       exclude: Optional[Sequence[str]] = None) -> ctdata.CTDataset:
    """Discover one or more dataset folders and check they can be trained on.

    Slices with a real QD/FD pair are used as they are. Full-dose-only slices need
    ``simulate_dose`` (the low dose is then simulated); low-dose-only slices cannot be trained on.
    ``exclude`` (``PATIENT`` or ``PATIENT:SLICE`` specs) holds slices out of training and
    validation, e.g. for a held-out test.
    """
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        paths = [paths]
    dataset = check_trainable(discover_all(paths, layout), simulate_dose)
    return apply_exclude(dataset, exclude)


def apply_exclude(dataset: ctdata.CTDataset, exclude: Optional[Sequence[str]]) -> ctdata.CTDataset:
    """``dataset`` without the ``exclude`` specs' slices; CTDataError if nothing is left."""
    if not exclude:
        return dataset
    kept = dataset.select(exclude=exclude)
    if not kept.records:
        raise ctio.CTDataError(f"--exclude {' '.join(exclude)}: everything excluded (no slice of "
                               f"{', '.join(dataset.patients)} is left to train on)")
    return kept


def discover_all(paths: Sequence[str], layout: Optional[str] = None) -> list[ctdata.CTDataset]:
    """``ctdata.discover`` each folder; unpaired DICOM series count as full dose."""
    return [ctdata.discover(p, layout, single_role="fd") for p in paths]


def check_trainable(found: list[ctdata.CTDataset],
                    simulate_dose: Optional[float] = None) -> ctdata.CTDataset:
    """Merge discovered folders, refusing slices that cannot be trained on (see above)."""
    if simulate_dose is not None and not 0.0 < simulate_dose < 1.0:
        raise ctio.CTDataError(f"--simulate-dose must be in (0, 1), got {simulate_dose}")
    records, layouts = [], []
    for ds in found:
        p = ds.root
        layouts.append(ds.layout)
        for r in ds.records:
            if not r.fd_path:
                raise ctio.CTDataError(f"{r.ld_path}: low-dose slice without a full-dose pair "
                                       "(training needs the full dose)")
            if not r.ld_path and simulate_dose is None:
                n = sum(not x.ld_path for x in ds.records)
                raise ctio.CTDataError(f"{p}: {n} full-dose slices without low-dose pairs (first: "
                                       f"{r.fd_path}); add --simulate-dose 0.25 to simulate them")
        records += ds.records
    keys = [(r.patient, r.slice_id) for r in records]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ctio.CTDataError(f"patient {dup[0]} slice {dup[1]} appears in two --data folders")
    return ctdata.CTDataset("+".join(sorted(set(layouts))), ",".join(d.root for d in found),
                            records)


def split_patients(dataset: ctdata.CTDataset, val_patients: Optional[Sequence[str]] = None,
                   val_fraction: float = VAL_FRACTION) -> Split:
    """Patient-level train/validation split.

    ``val_patients`` None: the last patient in sorted order when there are at least two, else
    the last ``val_fraction`` of the slices (by position). ``["none"]``: no validation.
    A single slice is used for both (stated in ``how``).
    """
    patients = dataset.patients
    recs = dataset.records
    if val_patients is not None and [v.lower() for v in val_patients] == ["none"]:
        return Split(recs, [], "no validation (--val-patients none)")
    if val_patients:
        missing = sorted(set(val_patients) - set(patients))
        if missing:
            raise ctio.CTDataError(f"--val-patients: {', '.join(missing)} not in the data "
                                   f"(patients: {', '.join(patients)})")
        train = [r for r in recs if r.patient not in val_patients]
        val = [r for r in recs if r.patient in val_patients]
        how = f"validation patients: {', '.join(val_patients)}"
    elif len(patients) >= 2:
        train = [r for r in recs if r.patient != patients[-1]]
        val = [r for r in recs if r.patient == patients[-1]]
        how = f"validation patient: {patients[-1]} (the last in sorted order)"
    elif len(recs) == 1:
        return Split(recs, recs, "one slice only: validation reuses the training slice "
                     "(figures are not a held-out estimate)")
    else:
        n_val = max(1, int(round(len(recs) * val_fraction)))
        train, val = recs[:-n_val], recs[-n_val:]
        how = f"one patient: the last {n_val} of {len(recs)} slices by position for validation"
    if not train:
        raise ctio.CTDataError("empty training split: every patient is a validation patient")
    return Split(train, val, how)


def load_pair(rec, simulate_dose: Optional[float] = None, seed: int = 0):
    """Decode one record to normalised float32 ``(ld, fd)`` of shape [H, W, 1]."""
    fd_hu, header = ctio.read_slice(rec.fd_path)
    if rec.ld_path:
        ld_hu = ctio.read_slice(rec.ld_path)[0]
        if ld_hu.shape != fd_hu.shape:
            raise ctio.CTDataError(f"size mismatch: {rec.ld_path} {ld_hu.shape} vs "
                                   f"{rec.fd_path} {fd_hu.shape}")
    else:
        import ctdose

        # The same noise as Mysimulate.py --input for the same seed (one seed rule, one I0
        # rule; the per-series tube-current factor needs the whole series: pre-simulate).
        pixel_mm = ctdose.pixel_size_mm(header, fd_hu.shape, None)
        ld_hu = ctdose.simulate_pair_from_fd(
            fd_hu, simulate_dose, pixel_mm, ctdose.slice_seed(seed, rec.patient, rec.slice_id),
            i0=ctdose.slice_i0(header))
    return ctio.normalize(ld_hu)[..., None], ctio.normalize(fd_hu)[..., None]


CACHE_VERSION = 1  # bump when what a cache file holds changes


class SliceCache:
    """Decoded, normalised (LD, FD) pairs on disk: one ``[H, W, 2]`` float32 ``.npy`` per slice,
    read back memory-mapped, so RAM does not grow with the data set.

    A file's name is a hash of everything its content depends on (both source files' paths,
    sizes and modification times, the simulated dose and seed, the normalisation), so a
    changed source file gets a new entry and a folder can be shared by several runs (training
    on the same data reuses it). Files are written under a temporary name and renamed: a
    killed run leaves no partial entry (its temporaries are removed at the next start).
    """

    def __init__(self, root, simulate_dose: Optional[float] = None, seed: int = 0) -> None:
        self.root = Path(root)  # created by the first write (a failed start writes none)
        ctio.remove_stale_temporaries([self.root])
        self.simulate_dose, self.seed = simulate_dose, seed

    def path(self, rec) -> Path:
        def stat(p):
            if not p:
                return None
            st = os.stat(ctio.split_frame(p)[0])  # a frame of a multi-frame file: its file
            return [os.path.abspath(p), st.st_size, st.st_mtime_ns]

        sim = None if rec.ld_path else [self.simulate_dose, self.seed]
        key = json.dumps([CACHE_VERSION, stat(rec.fd_path), stat(rec.ld_path), sim,
                          ctio.HU_MIN, ctio.HU_MAX])
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"

    def fill(self, records, workers: Optional[int] = None) -> int:
        """Decode every record not cached yet, in parallel threads, before training starts: a
        broken file fails here as one CTDataError, never inside the tf.data pipeline (where a
        failing Python call can deadlock TF's iterator teardown). Returns how many were new."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [r for r in records if not self.path(r).is_file()]
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            for _ in pool.map(self.load, todo):  # re-raises the first error
                pass
        return len(todo)

    def load(self, rec) -> tuple[np.ndarray, np.ndarray]:
        """``(ld, fd)`` ``[H, W, 1]`` float32, from the cache or decoded (and then cached)."""
        path = self.path(rec)
        try:
            pair = np.load(path, mmap_mode="r")
        except (OSError, ValueError):  # absent (or unreadable: decoded again and replaced)
            ld, fd = load_pair(rec, self.simulate_dose, self.seed)
            self.root.mkdir(parents=True, exist_ok=True)
            with ctio.atomic_path(path) as tmp:
                np.save(tmp, np.concatenate([ld, fd], axis=-1))
            return ld, fd
        return np.array(pair[..., :1]), np.array(pair[..., 1:])


def epoch_order(n: int, seed: int):
    """Slice indices of one pass: a random permutation of all ``n`` slices, a new one each time
    the dataset is iterated again (a shuffle over the whole set, not a window of file order;
    indices are cheap)."""
    import tensorflow as tf

    return tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True)


def _cached_slices(records, cache: SliceCache, seed: int, tf):
    """Endless ``(ld, fd)`` slices, pass after pass in :func:`epoch_order`, read through ``cache``.

    The parallel map runs on one finite pass and the pass is repeated after it: on an infinite
    input a failing read would leave the map with Python calls in flight, and TF's iterator
    destructor then waits for them while the main thread holds the GIL (a deadlock, seen when a
    truncated DICOM stopped training)."""

    def read(i):
        return cache.load(records[int(i)])

    def tf_read(i):
        ld, fd = tf.numpy_function(read, [i], [tf.float32, tf.float32], stateful=False)
        ld.set_shape([None, None, 1])
        fd.set_shape([None, None, 1])
        return ld, fd

    return (epoch_order(len(records), seed)
            .map(tf_read, num_parallel_calls=tf.data.AUTOTUNE).repeat())


def _decoded_slices(records, simulate_dose, seed, tf, order=None):
    """Dataset of decoded (ld, fd) slices, decoded in parallel by numpy and cached.

    ``order``: record indices to decode, in this order (default: every record once)."""

    def decode(i):
        return load_pair(records[int(i)], simulate_dose, seed)

    def tf_decode(i):
        ld, fd = tf.numpy_function(decode, [i], [tf.float32, tf.float32], stateful=False)
        ld.set_shape([None, None, 1])
        fd.set_shape([None, None, 1])
        return ld, fd

    order = np.arange(len(records)) if order is None else np.asarray(order, np.int64)
    return (tf.data.Dataset.from_tensor_slices(order)
            .map(tf_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .cache())


def split_by_kind(records, simulated_share: float) -> tuple[list, list]:
    """(real pairs, full-dose-only records) for ``--simulated-share``; CTDataError unless both
    kinds are there."""
    real = [r for r in records if r.ld_path]
    sim = [r for r in records if not r.ld_path]
    if not real or not sim:
        raise ctio.CTDataError(f"--simulated-share {simulated_share:g}: needs real pairs and "
                               f"full-dose-only slices in training; found {len(real)} real and "
                               f"{len(sim)} full-dose-only")
    return real, sim


def _slice_stream(records, cache: SliceCache, seed: int, simulated_share: Optional[float], tf):
    """Endless ``(ld, fd)`` slices: all records equally often, or real pairs and simulated ones
    mixed at ``simulated_share`` (each kind shuffled pass after pass on its own)."""
    if simulated_share is None:
        return _cached_slices(records, cache, seed, tf)
    real, sim = split_by_kind(records, simulated_share)
    return tf.data.Dataset.sample_from_datasets(
        [_cached_slices(real, cache, seed, tf), _cached_slices(sim, cache, seed + 1, tf)],
        weights=[1.0 - simulated_share, simulated_share], seed=seed)


def crop_to_multiple(ld, fd, multiple: int):
    """Centre-crop ``[H, W, 1]`` LD and FD to the largest multiple of ``multiple`` in H and W."""
    import tensorflow as tf

    h, w = tf.shape(ld)[0], tf.shape(ld)[1]
    hc, wc = (h // multiple) * multiple, (w // multiple) * multiple
    oy, ox = (h - hc) // 2, (w - wc) // 2
    return ld[oy:oy + hc, ox:ox + wc], fd[oy:oy + hc, ox:ox + wc]


def cropped_shape(shape, multiple: int) -> list:
    """The ``[H, W, 1]`` shape :func:`crop_to_multiple` gives a slice of ``shape``."""
    return [shape[0] // multiple * multiple, shape[1] // multiple * multiple, 1]


def random_patches(ld, fd, patch: int, k: int, skip_air: bool = True):
    """K random P x P patches at the same place in LD and FD: ([K,P,P,1], [K,P,P,1]).

    With ``skip_air``, 2K candidates are drawn and the K with the most body (FD above AIR_HU)
    are kept, so batches are not wasted on air.
    """
    import tensorflow as tf

    pair = tf.concat([ld, fd], axis=-1)  # [H, W, 2]
    n = 2 * k if skip_air else k
    crops = tf.stack([tf.image.random_crop(pair, [patch, patch, 2]) for _ in range(n)])
    if skip_air:
        body = tf.reduce_mean(tf.cast(crops[..., 1] > ctio.normalize(AIR_HU), tf.float32),
                              axis=[1, 2])  # [2K] fraction of body pixels
        crops = tf.gather(crops, tf.math.top_k(body, k).indices)
    return crops[..., :1], crops[..., 1:]


def augment(ld, fd):
    """Random flips and 90-degree rotations, the same for LD and FD ([K, P, P, 1] each).

    Each of the K square patches gets its own transform, drawn from the 8 symmetries of the
    square, computed for the whole stack at once (no per-patch map).
    """
    import tensorflow as tf

    pair = tf.concat([ld, fd], axis=-1)  # [K, P, P, 2]
    k = tf.shape(pair)[0]
    rots = tf.stack([tf.image.rot90(pair, r) for r in range(4)])  # [4, K, P, P, 2]
    pick = tf.random.uniform([k], 0, 4, dtype=tf.int32)
    pair = tf.gather_nd(rots, tf.stack([pick, tf.range(k)], axis=1))  # [K, P, P, 2]
    flip = tf.random.uniform([k, 1, 1, 1]) < 0.5
    pair = tf.where(flip, tf.reverse(pair, axis=[2]), pair)
    return pair[..., :1], pair[..., 1:]


def augment_flips(ld, fd):
    """Random left-right / up-down flips, the same for LD and FD ([K, H, W, 1], any H x W)."""
    import tensorflow as tf

    pair = tf.concat([ld, fd], axis=-1)
    k = tf.shape(pair)[0]
    pair = tf.where(tf.random.uniform([k, 1, 1, 1]) < 0.5, tf.reverse(pair, axis=[2]), pair)
    pair = tf.where(tf.random.uniform([k, 1, 1, 1]) < 0.5, tf.reverse(pair, axis=[1]), pair)
    return pair[..., :1], pair[..., 1:]


def make_train_dataset(records, *, patch: int = PATCH_SIZE, batch: int = 16,
                       patches_per_slice: int = PATCHES_PER_SLICE,
                       simulate_dose: Optional[float] = None, seed: int = 0,
                       augment_data: bool = True, skip_air: bool = True, multiple: int = 1,
                       cache_dir=None, simulated_share: Optional[float] = None):
    """Infinite, shuffled, batched ``(ld, fd)`` patches [B, P, P, 1].

    ``simulated_share``: the fraction of slices (hence of patches) drawn from the full-dose-only
    records (low dose simulated at ``simulate_dose``), the rest from the real pairs
    (``tf.data.Dataset.sample_from_datasets``); None: every slice equally often, whatever its kind.

    P = 0: whole slices (of one size), centre-cropped to a multiple of ``multiple`` (the
    network's ``2**depth``), with a static shape so the training step is traced once.
    Decoded slices are kept in a :class:`SliceCache` in ``cache_dir`` (memory-mapped files;
    default: a temporary folder removed at exit), never all in RAM; every pass over the data
    visits the slices in a new random order."""
    tf = ctio.import_tensorflow()
    if not records:
        raise ctio.CTDataError("empty training split")
    if patch:
        small = min(records, key=lambda r: min(r.shape))
        if patch > min(small.shape):
            raise ctio.CTDataError(f"--patch {patch} is larger than the slice "
                                   f"{small.fd_path} ({small.shape[0]}x{small.shape[1]})")
    elif len({r.shape for r in records}) > 1:
        raise ctio.CTDataError("--patch 0 (whole slices) needs slices of one size; found "
                               + ", ".join(sorted({f'{a}x{b}' for a, b in
                                                   {r.shape for r in records}})))
    if cache_dir is None:
        import atexit
        import shutil
        import tempfile

        cache_dir = tempfile.mkdtemp(prefix="cncl-slices-")
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    cache = SliceCache(cache_dir, simulate_dose, seed)
    cache.fill(records)
    ds = _slice_stream(records, cache, seed, simulated_share, tf)
    if patch:
        ds = ds.map(lambda a, b: random_patches(a, b, patch, patches_per_slice, skip_air),
                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        static = cropped_shape(records[0].shape, multiple)
        if min(static[:2]) < 1:
            raise ctio.CTDataError(f"--patch 0: slices of {records[0].shape[0]}x"
                                   f"{records[0].shape[1]} are smaller than {multiple}")
        ds = ds.map(lambda a, b: [tf.ensure_shape(x, static)[None]  # one slice: [1, H, W, 1]
                                  for x in crop_to_multiple(a, b, multiple)])
    if augment_data:  # 90-degree rotations need square images; whole slices may not be
        square = bool(patch) or all(r.shape[0] == r.shape[1] for r in records)
        ds = ds.map(augment if square else augment_flips, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.unbatch()
    if patch:
        ds = ds.shuffle(patches_per_slice * 32, seed=seed)
    return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def pick_val_slices(records, max_slices: int) -> list:
    """At most ``max_slices`` validation records, evenly spaced (validation stays cheap)."""
    if len(records) <= max_slices:
        return list(records)
    idx = np.linspace(0, len(records) - 1, max_slices).round().astype(int)
    return [records[i] for i in idx]


def replica_order(shapes, replicas: int) -> tuple[list[int], list[float]]:
    """Order and weights of validation images so that no replica ever gets an empty batch.

    Images are grouped by shape (a batch holds one shape); each group is padded with copies of
    its first image at weight 0 to a multiple of ``replicas``. Batched by ``replicas``, every
    global batch then gives each replica exactly one image, and the weight-0 copies count in no
    metric. Returns ``(indices into shapes, weights)``.
    """
    groups: dict = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(i)
    order, weights = [], []
    for members in groups.values():
        pad = -len(members) % replicas
        order += members + [members[0]] * pad
        weights += [1.0] * len(members) + [0.0] * pad
    return order, weights


def make_val_dataset(records, *, multiple: int, replicas: int = 1,
                     simulate_dose: Optional[float] = None, seed: int = 0):
    """Whole validation slices ``(ld, fd, weight)``, centre-cropped to a multiple of
    ``multiple``, in global batches of ``replicas`` images of one shape (one per replica;
    see :func:`replica_order`), cached. Slices of several sizes are fine."""
    tf = ctio.import_tensorflow()
    shapes = [tuple(cropped_shape(r.shape, multiple)) for r in records]
    order, weights = replica_order(shapes, replicas)
    ds = _decoded_slices(records, simulate_dose, seed, tf, order)
    ds = ds.map(lambda a, b: crop_to_multiple(a, b, multiple))
    if len(set(shapes)) == 1:  # a static shape: one trace of the validation step, not one per slice
        static = list(shapes[0])
        ds = ds.map(lambda a, b: (tf.ensure_shape(a, static), tf.ensure_shape(b, static)))
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.from_tensor_slices(np.float32(weights)))
    ds = ds.map(lambda pair, w: (pair[0], pair[1], w))
    return ds.batch(replicas).prefetch(tf.data.AUTOTUNE)


def main(argv=None) -> int:
    ap = ctio.ArgumentParser(description="Check a dataset for training (Mytrain.py).",
                             formatter_class=ctio.HelpFormatter)
    ap.add_argument("--data", required=True, nargs="+", help="dataset folder(s)")
    ap.add_argument("--layout", choices=ctdata.LAYOUTS, default=None,
                    help="override layout auto-detection")
    ap.add_argument("--simulate-dose", type=float, default=None,
                    help="simulate this dose fraction for full-dose-only slices")
    ap.add_argument("--val-patients", nargs="+", default=None,
                    help="validation patients (default: the last patient; 'none' for none)")
    ap.add_argument("--exclude", nargs="+", default=None, metavar="SPEC",
                    help="hold out slices: PATIENT or PATIENT:SLICE (e.g. L506:160)")
    ap.add_argument("--recipe", choices=tuple(ctrun.RECIPES), default=ctrun.DEFAULT_RECIPE,
                    help="the Mytrain.py --recipe whose patch size to report")
    args = ap.parse_args(argv)
    found = discover_all(args.data, args.layout)
    if args.simulate_dose is None:
        # A full-dose-only folder is a valid dataset for simulation: summarise it and say so.
        if all(not r.ld_path for d in found for r in d.records):
            for d, p in zip(found, args.data):
                ctdata.print_summary(ctdata.summarize(d), p)
            print("note:      full dose only: train on it with --simulate-dose 0.25 "
                  "(or simulate a dataset with Mysimulate.py)")
            return 0
    ds = apply_exclude(check_trainable(found, args.simulate_dose), args.exclude)
    ctdata.print_summary(ctdata.summarize(ds), " ".join(args.data))
    split = split_patients(ds, args.val_patients)
    print(f"split:     {len(split.train)} training / {len(split.val)} validation slices; "
          f"{split.how}")
    if args.simulate_dose is not None:
        n = sum(not r.ld_path for r in ds.records)
        print(f"simulate:  dose {args.simulate_dose} for {n} full-dose-only slices")
    print(training_input(args.recipe, len(split.train)))
    return 0


def training_input(recipe: str, train_slices: int) -> str:
    """What Mytrain.py's ``recipe`` (without --patch) trains on: its patch size or whole slices."""
    patch = ctrun.RECIPES[recipe]["patch"]
    if not patch:
        return (f"patches:   none: recipe {recipe} trains on whole slices ({train_slices} per "
                "pass)")
    return (f"patches:   {PATCHES_PER_SLICE} per slice of {patch}x{patch} (recipe {recipe}; "
            f"Mytrain.py --patch changes it; ~{train_slices * PATCHES_PER_SLICE} per pass over "
            "the slices)")


if __name__ == "__main__":
    ctio.run_cli(main)
