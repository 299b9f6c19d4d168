"""Training on several workers (issue: train beyond one device).

Workers are real processes on 127.0.0.1 joined by TF_CONFIG, as on a cluster. Every subprocess
has a timeout and is killed on failure, so a hang fails the test instead of blocking CI.

Run as a script, this file is the worker of the equivalence test:
    python tests/test_distributed.py one-step OUT_DIR   # (+ TF_CONFIG for MultiWorkerMirrored)
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_one_error_line, cli, history_epochs

TRAIN = ["--preset", "small", "--patch", "32", "--batch", "4", "--steps-per-epoch", "3",
         "--val-slices", "1", "--verbose", "2", "--strategy", "multiworker"]
TIMEOUT = 240  # seconds for one multi-worker run (about 60-90 s on 2 busy cores)


# --- Helpers ------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_configs(n: int) -> list[str]:
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(n)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(n)]


def start(cmd: list, log: Path, onednn: str = "1", **env) -> subprocess.Popen:
    """A process in its own group (so all of it can be killed), output to `log`.

    TF_ENABLE_ONEDNN_OPTS is always set explicitly: unset, TensorFlow decides by the CPU (on with
    AVX-512 VNNI / AMX), so a test that leaves it unset tests a different path on each machine.
    "1" is the default here because it is the path that used to fail (TF 2.21's oneDNN Conv2D
    gives an empty batch the wrong shape; validation must never hand a replica one)."""
    with open(log, "w") as f:
        return subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                                               "TF_ENABLE_ONEDNN_OPTS": onednn, **env},
                                start_new_session=True)


def kill(procs) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def wait_all(procs, timeout: float = TIMEOUT) -> list[int]:
    """Exit codes; on timeout every process is killed and the test fails."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill(procs)
        pytest.fail(f"workers still running after {timeout} s (hang?)")
    finally:
        kill(procs)
    return [p.returncode for p in procs]


def start_workers(tmp: Path, outs: list, extra: list, tag: str, configs: list):
    """One Mytrain.py per TF_CONFIG; worker i gets --out outs[i] and its own TMPDIR."""
    procs, logs = [], []
    for i, (out, cfg) in enumerate(zip(outs, configs)):
        tmpdir = tmp / f"tmp{i}"
        tmpdir.mkdir(exist_ok=True)
        logs.append(tmp / f"{tag}-w{i}.log")
        procs.append(start([sys.executable, REPO / "Mytrain.py", "--out", out, *extra], logs[-1],
                           TF_CONFIG=cfg, TMPDIR=str(tmpdir)))
    return procs, logs


# --- (1) Two workers: train, be interrupted, restart with the same command ------------------
@pytest.mark.slow
def test_two_workers_train_and_restart_after_interruption(mayo_tree, tmp_path):
    """Two workers train 2 epochs with validation (3 slices of P02: one worker gets a weight-0
    copy at the last step), oneDNN on; only the chief writes. Worker 1 is killed after epoch 1,
    the chief stops with one error line, and the same two commands run again continue from the
    chief's state/ (the one checkpoint of every run; worker 1 takes it from the chief, it has no
    files of its own); the finished run looks like any other."""
    outs = [tmp_path / "run", tmp_path / "run-worker1"]  # different --out: nothing may land in #1
    args = ["--data", mayo_tree, *TRAIN, "--val-slices", "3", "--epochs", "2"]
    meta = outs[0] / "state" / "state.json"

    procs, logs = start_workers(tmp_path, outs, args, "first", tf_configs(2))
    try:  # kill worker 1 once the first epoch is saved (as a preemption would)
        deadline = time.monotonic() + TIMEOUT
        while not meta.is_file() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), \
                "a worker stopped early:\n" + "\n".join(f.read_text() for f in logs)
            time.sleep(0.1)
        assert meta.is_file(), "no state after the first epoch:\n" + logs[0].read_text()
    finally:
        kill(procs[1:])
    assert wait_all(procs[:1], timeout=120) == [1]  # the chief notices and stops by itself
    chief_log = logs[0].read_text()
    assert "error: RuntimeError: lost contact with another worker" in chief_log, chief_log
    assert "Traceback" not in chief_log
    assert history_epochs(outs[0]) == [1], "interrupted too late"
    assert not outs[1].exists(), "a non-chief worker wrote into its --out"
    killed = set((tmp_path / "tmp1").iterdir())  # SIGKILL leaves the worker's temporary folder

    procs, logs = start_workers(tmp_path, outs, args, "again", tf_configs(2))
    codes = wait_all(procs)
    text = [f.read_text() for f in logs]
    assert codes == [0, 0], "\n----\n".join(text)
    assert "restarting the interrupted multi-worker run" in text[0], text[0]
    for t in text:
        assert "Epoch 1/2" not in t and "Epoch 2/2" in t, t

    assert history_epochs(outs[0]) == [1, 2]
    with open(outs[0] / "history.csv") as f:
        psnr = [float(r["val_psnr"]) for r in csv.DictReader(f)]
    assert all(10 < p < 80 for p in psnr), psnr  # a mean over real slices, not halved by padding
    weights = [p for p in tmp_path.rglob("generator_latest.weights.h5")
               if not any(k in p.parents for k in killed)]
    assert weights == [outs[0] / "generator_latest.weights.h5"], weights
    assert (outs[0] / "config.json").is_file()
    assert json.loads((outs[0] / "state" / "state.json").read_text())["epoch"] == 2
    assert not outs[1].exists()
    assert set((tmp_path / "tmp1").iterdir()) == killed, "the worker's temporary folder stays"


# --- (2) One worker vs two workers: the same step -----------------------------------------------
def one_step(out: Path) -> None:
    """Worker of the equivalence test: one SGD step of CNCL on a fixed global batch of 4.

    Writes out/<task>.json (logs, per-replica batch sizes and sample ids of the first batch,
    validation metrics) and out/<task>.npz (G and D weights before and after the step). Plain SGD,
    unlike Adam's first step, makes the update proportional to the gradient, so a gradient summed
    but not averaged over the replicas would show. Instance norm: batch statistics would differ
    with the per-replica batch. A moving average of G (``ema_decay``, updated by each replica in
    its replica context) is among the weights compared, and is what validation scores.
    """
    sys.path.insert(0, str(REPO))
    import ctio
    import Mytrain

    _, n_workers = Mytrain.worker_role()
    tf = ctio.import_tensorflow()
    strategy = Mytrain.make_strategy("auto", tf)  # before any tensor exists
    import keras

    import Mymodel

    ctio.set_seed(0)
    rng = np.random.default_rng(0)
    fd = rng.uniform(0.2, 0.3, (4, 32, 32, 1)).astype(np.float32)
    ld = (fd + rng.normal(0, 0.01, fd.shape)).astype(np.float32)
    fd[..., 0] += np.arange(4)[:, None, None] * 0.01  # sample id: round((mean - 0.25) * 100)
    train = tf.data.Dataset.from_tensor_slices((ld, fd)).batch(4, drop_remainder=True).repeat()
    # 3 validation images, one per replica and step (as Mytrain's validation): padded with a
    # weight-0 copy for two replicas, so no replica ever gets an empty batch
    import MyDataLoader_train as loader

    order, w = loader.replica_order([ld.shape[1:]] * 3, strategy.num_replicas_in_sync)
    val = tf.data.Dataset.from_tensor_slices((ld[order], fd[order], np.float32(w)))
    val = val.batch(strategy.num_replicas_in_sync)
    if n_workers > 1:
        train, val = Mytrain.shard_by_data(train, tf), Mytrain.shard_by_data(val, tf)

    first = next(iter(strategy.experimental_distribute_dataset(train)))[1]
    local = strategy.experimental_local_results(first)
    seen = [int(round((float(np.mean(x[i])) - 0.25) * 100)) for x in local for i in range(len(x))]

    cfg = Mymodel.model_config("small", base_filters=4, depth=2, norm="instance", disc_filters=8)
    with strategy.scope():
        gan = Mymodel.CNCLGAN(*Mymodel.build_models(cfg))
        gan.compile(g_optimizer=keras.optimizers.SGD(1e-3), d_optimizer=keras.optimizers.SGD(1e-3),
                    lambda_l1=100.0, adv_weight=1.0, ema_decay=0.5)
    Mytrain.prepare_for_fit(gan, strategy, 2 ** cfg["depth"], n_workers, tf)
    gan(ld[:1])  # build (the default strategy builds lazily)

    def weights():
        return [v.numpy() for v in
                gan.generator.weights + gan.discriminator.weights + gan.ema_generator.weights]

    before = weights()
    hist = gan.fit(train, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    after = weights()
    val_logs = gan.evaluate(val, verbose=0, return_dict=True)
    name = "single"
    if os.environ.get("TF_CONFIG"):
        name = f"worker{json.loads(os.environ['TF_CONFIG'])['task']['index']}"
    np.savez(out / f"{name}.npz", *before, *after)
    (out / f"{name}.json").write_text(json.dumps({
        "replicas": strategy.num_replicas_in_sync, "local_batches": [len(x) for x in local],
        "samples": seen, "logs": {k: float(v[-1]) for k, v in hist.history.items()},
        "val": {k: float(v) for k, v in val_logs.items()}, "n_weights": len(before)}))


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ["0", "1"])
def test_one_worker_and_two_workers_take_the_same_step(tmp_path, onednn):
    """The same step and validation figures on one and on two workers, with TF's oneDNN
    kernels forced off and on (unset, TF chooses by the CPU)."""
    helper = [sys.executable, Path(__file__).resolve(), "one-step", tmp_path]
    other = tmp_path / "other"  # one worker with the other kernel library
    other.mkdir()
    procs = [start(helper, tmp_path / "single.log", onednn, TF_CONFIG="")]
    procs += [start(helper, tmp_path / f"w{i}.log", onednn, TF_CONFIG=c)
              for i, c in enumerate(tf_configs(2))]
    procs.append(start([*helper[:-1], other], tmp_path / "other.log",
                       "1" if onednn == "0" else "0", TF_CONFIG=""))
    codes = wait_all(procs)
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in ("single", "w0", "w1", "other")}
    assert codes == [0, 0, 0, 0], logs

    res = {n: json.loads((tmp_path / f"{n}.json").read_text())
           for n in ("single", "worker0", "worker1")}
    # oneDNN on and off: the same losses and validation figures (float32 summation order).
    flipped = json.loads((other / "single.json").read_text())
    for part in ("logs", "val"):
        for k, v in res["single"][part].items():
            assert flipped[part][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (part, k)
    # The global batch of 4 is split 2 + 2 over the workers, without overlap.
    assert res["single"]["local_batches"] == [4]
    assert res["worker0"]["replicas"] == 2
    assert res["worker0"]["local_batches"] == res["worker1"]["local_batches"] == [2]
    assert sorted(res["worker0"]["samples"] + res["worker1"]["samples"]) == [0, 1, 2, 3]

    # Losses of the step (global means) and validation metrics agree.
    for name in ("worker0", "worker1"):
        for part in ("logs", "val"):
            a, b = res["single"][part], res[name][part]
            assert a.keys() == b.keys()
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (part, k, a[k], b[k])

    # Same start, same update (SGD: proportional to the gradient averaged over the batch).
    n = res["single"]["n_weights"]
    w = {name: np.load(tmp_path / f"{name}.npz") for name in res}
    w = {name: [f[f"arr_{i}"] for i in range(2 * n)] for name, f in w.items()}
    step = {name: [w[name][n + i] - w[name][i] for i in range(n)] for name in w}
    flat = {name: np.concatenate([d.ravel() for d in steps]) for name, steps in step.items()}
    assert np.abs(flat["single"]).max() > 1e-3, "the step changed almost nothing"
    for name in ("worker0", "worker1"):
        for i in range(n):
            np.testing.assert_array_equal(w[name][i], w["single"][i])
        diff = np.linalg.norm(flat[name] - flat["single"]) / np.linalg.norm(flat["single"])
        assert diff < 1e-5, (name, diff)  # measured ~1e-7 (float32 summation order)
        worst = np.abs(flat[name] - flat["single"]).max() / np.abs(flat["single"]).max()
        assert worst < 1e-5, (name, worst)


# --- (3) A malformed TF_CONFIG is one clear error, not a hang ----------------------------------
W2 = {"worker": ["127.0.0.1:20001", "127.0.0.1:20002"]}


@pytest.mark.parametrize("tf_config,needle", [
    ("{not json", "not valid JSON"),
    ('["worker"]', "JSON object"),
    (json.dumps({"cluster": W2}), 'no "task"'),
    (json.dumps({"task": {"type": "worker", "index": 0}}), 'no "cluster"'),
    (json.dumps({"cluster": {"worker": ["127.0.0.1"]}, "task": {"type": "worker", "index": 0}}),
     "bad address"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:99999"]},
                 "task": {"type": "worker", "index": 0}}), "bad address"),
    (json.dumps({"cluster": {"worker": ["host:port"]}, "task": {"type": "worker", "index": 0}}),
     "bad address"),
    (json.dumps({"cluster": {"worker": "127.0.0.1:20001"},
                 "task": {"type": "worker", "index": 0}}), "non-empty list"),
    (json.dumps({"cluster": W2, "task": {"type": "worker", "index": 2}}), "out of range"),
    (json.dumps({"cluster": W2, "task": {"type": "worker", "index": -1}}), "out of range"),
    (json.dumps({"cluster": W2, "task": {"type": "worker", "index": "0"}}), "out of range"),
    (json.dumps({"cluster": W2, "task": {"type": "chief", "index": 0}}), "not a job"),
    (json.dumps({"cluster": {**W2, "ps": ["127.0.0.1:20003"]},
                 "task": {"type": "worker", "index": 0}}), "not supported"),
    (json.dumps({"cluster": {"worker": ["127.0.0.1:20001", "127.0.0.1:20001"]},
                 "task": {"type": "worker", "index": 0}}), "twice"),
])
def test_malformed_tf_config_is_one_error_line(tmp_path, tf_config, needle):
    p = cli("Mytrain.py", "--out", tmp_path / "run", "--data", tmp_path / "no-data",
            timeout=60, env={"TF_CONFIG": tf_config})
    assert_one_error_line(p, "error: TF_CONFIG", needle, code=2)
    assert not (tmp_path / "run").exists()


def test_tf_config_needs_the_multiworker_strategy(tmp_path):
    cfg = json.dumps({"cluster": W2, "task": {"type": "worker", "index": 1}})
    p = cli("Mytrain.py", "--strategy", "default", "--out", tmp_path / "run", timeout=60,
            env={"TF_CONFIG": cfg})
    assert_one_error_line(p, "--strategy default with TF_CONFIG", code=2)


def test_worker_role(monkeypatch):
    sys.path.insert(0, str(REPO))
    import Mytrain

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert Mytrain.worker_role() == (True, 1)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": W2,
                                                "task": {"type": "worker", "index": 1}}))
    assert Mytrain.worker_role() == (False, 2)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {**W2, "chief": ["10.0.0.1:2222"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert Mytrain.worker_role("multiworker") == (False, 3)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {**W2, "chief": ["10.0.0.1:2222"]},
                                                "task": {"type": "chief", "index": 0}}))
    assert Mytrain.worker_role() == (True, 3)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "one-step":
        one_step(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
