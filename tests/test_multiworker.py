"""--strategy=multi_worker: two real train.py workers over 127.0.0.1, and what guards them.

Two one-replica workers train resnet8 on tiny synthetic data with a global batch of 16; the
reference is the same run on one device. With each worker taking its rows of every global batch (``kd_tf2.data.load`` with
an input context) and BatchNorm synchronised over the workers, the two runs compute the same thing
in a different float32 summation order: the gradient is an all-reduced sum of two half-batch sums,
the BatchNorm moments are summed across workers. Measured: losses agree to ~1e-7 relative and the
exported weights to ~7e-7 (weights up to ~1.7); a wrong split (each worker on its own half of the
data) moves the epoch loss by ~1e-2 and the weights by ~0.4. Hence rel 1e-4 and atol 1e-4.

Every subprocess runs under a hard timeout and is killed (SIGKILL: TF's multi-worker start ignores
SIGTERM) when it expires.
"""
import glob
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_tf2 import data, engine
from kd_tf2.engine import config as cfg
from kd_tf2.engine.strategy import ClusterTask, read_tf_config, wait_for_peers
from kd_tf2.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "synthetic:train=32,test=16,size=8"
TRAIN = ["--method=none", "--arch=resnet8", f"--dataset={DATA}", "--batch_size=16",
         "--epochs=2", "--seed=1", "--strategy=multi_worker", "--cluster_timeout=60"]
HARD_TIMEOUT = 300  # seconds for a whole group of processes; then every one is killed


def free_ports(n):
  """n distinct ports that were free on 127.0.0.1 a moment ago."""
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def tf_config(ports, index):
  return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}})


def launch(workdir, name, args, tf_config_json, tmpdir=None):
  """Start train.py with its output in workdir/name.out|err; returns (name, Popen)."""
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=tf_config_json)
  if tmpdir:
    os.makedirs(tmpdir, exist_ok=True)
    env["TMPDIR"] = tmpdir
  out = open(os.path.join(workdir, f"{name}.out"), "w")
  err = open(os.path.join(workdir, f"{name}.err"), "w")
  with out, err:
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=workdir,
                            env=env, stdout=out, stderr=err, start_new_session=True)
  return name, proc


def finish(workdir, procs, timeout=HARD_TIMEOUT):
  """Wait for every process; kill them all once ``timeout`` seconds have passed since this call.
  Returns {name: (exit code, stdout, stderr)}."""
  killer = threading.Timer(timeout, lambda: [p.kill() for _, p in procs if p.poll() is None])
  killer.start()
  try:
    codes = {name: p.wait() for name, p in procs}
  finally:
    killer.cancel()
  result = {}
  for name, _ in procs:
    with open(os.path.join(workdir, f"{name}.out")) as f, \
        open(os.path.join(workdir, f"{name}.err")) as g:
      result[name] = (codes[name], f.read(), g.read())
  return result


def student_weights(keras_file):
  """{variable path: array} from the weights inside an exported .keras file (no TF needed)."""
  with zipfile.ZipFile(keras_file) as z:
    blob = io.BytesIO(z.read("model.weights.h5"))
  out = {}
  with h5py.File(blob, "r") as f:
    f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                 if isinstance(obj, h5py.Dataset) else None)
  return out


def metrics(train_dir):
  """The records of metrics.jsonl: one per epoch written (by the chief)."""
  with open(os.path.join(train_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f.read().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two workers sharing one train dir (subprocesses) and, meanwhile, the same run on one device
  in this process (seeded first: the engine builds the workers' input pipelines after seeding)."""
  work = str(tmp_path_factory.mktemp("multiworker"))
  ports = free_ports(2)
  procs = [launch(work, f"worker{i}", TRAIN + ["--train_dir=pair"], tf_config(ports, i),
                  tmpdir=os.path.join(work, f"tmp{i}")) for i in range(2)]
  try:
    keras.utils.set_random_seed(1)
    engine.train(engine.TrainConfig(method="none", arch="resnet8", dataset=DATA, batch_size=16,
                                    epochs=2, seed=1, strategy="one_device", verbose=False,
                                    train_dir=os.path.join(work, "single")))
  finally:
    results = finish(work, procs)
  for name, (code, out, err) in results.items():
    assert code == 0, f"{name}: exit {code}\n{out[-2000:]}\n{err[-4000:]}"
    assert "Traceback" not in err, f"{name}:\n{err[-4000:]}"
  return work, results


def test_two_workers_match_one_device_on_the_same_global_batch(runs):
  work, results = runs
  pair, single = metrics(os.path.join(work, "pair")), metrics(os.path.join(work, "single"))
  assert [m["epoch"] for m in pair] == [m["epoch"] for m in single] == [1, 2]
  for a, b in zip(pair, single):
    for key in ("train/loss", "train/ce", "test/loss"):
      assert a[key] == pytest.approx(b[key], rel=1e-4), (a["epoch"], key)
    for key in ("train/top1", "test/top1", "test/n"):
      assert a[key] == b[key], (a["epoch"], key)
  mine = student_weights(os.path.join(work, "pair", "student.keras"))
  reference = student_weights(os.path.join(work, "single", "student.keras"))
  assert sorted(mine) == sorted(reference)
  for name in reference:
    np.testing.assert_allclose(mine[name], reference[name], rtol=0, atol=1e-4, err_msg=name)
  # Both workers report the same results (the last stdout line).
  lines = [json.loads(results[f"worker{i}"][1].strip().splitlines()[-1]) for i in range(2)]
  assert lines[0]["top1"] == lines[1]["top1"] and lines[0]["loss"] == lines[1]["loss"]


def test_only_the_chief_writes_the_train_dir(runs):
  work, results = runs
  pair = os.path.join(work, "pair")
  assert len(glob.glob(os.path.join(pair, "events.out.tfevents.*"))) == 1
  assert len(metrics(pair)) == 2  # one line per epoch, not one per worker
  for name in ("flags.json", "results.json", "student.keras", "saved_model"):
    assert os.path.exists(os.path.join(pair, name)), name
  assert sorted(os.listdir(os.path.join(pair, "checkpoints"))) == [
      "checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index", "ckpt-2.data-00000-of-00001",
      "ckpt-2.index"]
  # The non-chief saved its (required, collective) checkpoints in a scratch dir under its TMPDIR,
  # deleted when training ended; the chief never made one.
  scratch = os.path.join(work, "tmp1", "kd_tf2_worker_")
  assert "not the chief: this worker's checkpoints go to " + scratch in results["worker1"][1]
  assert "not the chief" not in results["worker0"][1]
  assert not glob.glob(os.path.join(work, "tmp*", "kd_tf2_worker_*"))


def test_a_missing_peer_fails_in_one_line_after_cluster_timeout(tmp_path):
  ports = free_ports(2)
  name_proc = launch(str(tmp_path), "alone", TRAIN[:-1] + ["--cluster_timeout=3",
                                                         "--train_dir=alone"], tf_config(ports, 0))
  code, out, err = finish(str(tmp_path), [name_proc], timeout=120)["alone"]
  lines = err.strip().splitlines()
  assert code == 2, f"exit {code}\n{out}\n{err}"
  assert len(lines) == 1 and "Traceback" not in err, err
  assert f"127.0.0.1:{ports[1]} (worker 1)" in lines[0] and "--cluster_timeout=3s" in lines[0]
  assert f"127.0.0.1:{ports[0]}" not in lines[0]  # itself is not missing
  assert not os.path.exists(tmp_path / "alone")  # nothing written


def test_a_peer_that_goes_away_before_registering_is_named_after_cluster_timeout(tmp_path):
  """The peer answers the start-up probe, then dies before joining: TF's strategy constructor
  would wait forever; the watchdog ends the process after --cluster_timeout with one line."""
  ports = free_ports(2)
  fake_peer = socket.create_server(("127.0.0.1", ports[1]))

  def answer_once_then_die():
    connection, _ = fake_peer.accept()
    connection.close()
    fake_peer.close()

  threading.Thread(target=answer_once_then_die, daemon=True).start()
  name_proc = launch(str(tmp_path), "left", TRAIN[:-1] + ["--cluster_timeout=3",
                                                        "--train_dir=left"], tf_config(ports, 0))
  code, out, err = finish(str(tmp_path), [name_proc], timeout=120)["left"]
  lines = err.strip().splitlines()
  assert code == 2, f"exit {code}\n{out}\n{err}"
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith("train.py: error: --cluster_timeout=3s passed while TF_CONFIG's "
                             f"tasks registered with each other: 127.0.0.1:{ports[1]} (worker 1) "
                             "went away after the start-up check"), lines[0]
  assert not os.path.exists(tmp_path / "left")  # nothing written


KILLED = ["--method=none", "--arch=resnet8", "--dataset=synthetic:train=256,test=16,size=8",
          "--batch_size=16", "--epochs=2", "--seed=1", "--strategy=multi_worker",
          "--cluster_timeout=60", "--train_dir=pair"]


def _wait_for(path, procs, timeout):
  """Until ``path`` exists; fails (killing ``procs``) if one of them ends first or on timeout."""
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    ended = [name for name, p in procs if p.poll() is not None]
    if ended or time.monotonic() > deadline:
      for _, p in procs:
        p.kill()
      pytest.fail(f"{path} never appeared (ended early: {ended})")
    time.sleep(0.2)


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_is_named_and_a_relaunch_resumes(tmp_path):
  """kill -9 worker 1 during epoch 2: the chief stops with one line naming it (exit 1, no
  traceback; TensorFlow's own C++ log records may precede it). The same command relaunched on both
  resumes from the chief's epoch-1 checkpoint and finishes: every epoch logged once."""
  work, ports = str(tmp_path), free_ports(2)
  pair = os.path.join(work, "pair")
  procs = [launch(work, f"first{i}", KILLED, tf_config(ports, i),
                  tmpdir=os.path.join(work, f"tmp{i}")) for i in range(2)]
  _wait_for(os.path.join(pair, "checkpoints", "checkpoint"), procs, HARD_TIMEOUT)
  time.sleep(1.0)  # into epoch 2 (about 10 s here)
  procs[1][1].kill()
  code, out, err = finish(work, procs[:1], timeout=120)["first0"]
  procs[1][1].wait()
  ours = [line for line in err.splitlines() if line.startswith("train.py:")]
  assert code == 1, f"exit {code}\n{out[-2000:]}\n{err[-4000:]}"
  assert "Traceback" not in err and len(ours) == 1 and err.strip().endswith(ours[0]), err
  assert ours[0].startswith(f"train.py: error: 127.0.0.1:{ports[1]} (worker 1) went away during "
                            "training"), ours[0]
  assert "relaunch every task of the cluster with the same command" in ours[0]
  assert [m["epoch"] for m in metrics(pair)] == [1]
  assert not os.path.exists(os.path.join(pair, "results.json"))

  procs = [launch(work, f"again{i}", KILLED, tf_config(ports, i),
                  tmpdir=os.path.join(work, f"tmp{i}")) for i in range(2)]
  results = finish(work, procs)
  for name, (code, out, err) in results.items():
    assert code == 0, f"{name}: exit {code}\n{out[-2000:]}\n{err[-4000:]}"
    assert "Traceback" not in err and "resuming from epoch 1" in out, f"{name}:\n{out}\n{err}"
  assert [m["epoch"] for m in metrics(pair)] == [1, 2]
  with open(os.path.join(pair, "results.json")) as f:
    assert json.load(f)["epochs"] == 2


# ---------------------------------------------------------------- in process, no training


def test_wait_for_peers_meets_a_peer_that_waits_too():
  """Both tasks probe each other before either has a TF server (which each starts only once its
  probe is through): each one's placeholder listener lets the other through."""
  ports = free_ports(2)
  cluster = {"worker": tuple(f"127.0.0.1:{p}" for p in ports)}
  errors, done = [], threading.Barrier(3)

  def task(index):
    try:
      wait_for_peers(ClusterTask(cluster, "worker", index), timeout=30)
    except UsageError as e:
      errors.append(e)
    with socket.create_server(("127.0.0.1", ports[index])):  # the "TF server"
      done.wait(60)

  threads = [threading.Thread(target=task, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  done.wait(60)
  for t in threads:
    t.join(60)
  assert not errors and not any(t.is_alive() for t in threads)


def test_wait_for_peers_names_the_unreachable_ones():
  ports = free_ports(3)
  cluster = {"chief": (f"127.0.0.1:{ports[0]}",),
             "worker": (f"127.0.0.1:{ports[1]}", f"localhost:{ports[2]}")}
  with pytest.raises(UsageError) as e:
    wait_for_peers(ClusterTask(cluster, "worker", 0), timeout=0.3)
  message = str(e.value)
  assert f"127.0.0.1:{ports[0]} (chief 0)" in message
  assert f"localhost:{ports[2]} (worker 1)" in message
  assert f"127.0.0.1:{ports[1]}" not in message and "\n" not in message


def test_wait_for_peers_refuses_a_port_in_use():
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cluster = {"worker": (f"127.0.0.1:{port}", "127.0.0.1:1")}
    with pytest.raises(UsageError, match=rf"cannot listen on port {port}"):
      wait_for_peers(ClusterTask(cluster, "worker", 0), timeout=1)


OK_CLUSTER = {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}


@pytest.mark.parametrize("text,match", [
    ("", r"needs the TF_CONFIG environment variable"),
    ("{cluster", r"TF_CONFIG is not JSON"),
    ("[1]", r"is not a JSON object"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), r'"cluster"=None: must map jobs'),
    (json.dumps({"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 0}}),
     r"cluster job 'ps' is not supported .* accepted jobs: chief, worker"),
    (json.dumps({"cluster": {"worker": "h:1"}, "task": {}}), r"is not a non-empty list"),
    (json.dumps({"cluster": {"worker": ["h:1", "h"]}, "task": {}}),
     r"address 'h' \(worker 1\) is not \"host:port\""),
    (json.dumps({"cluster": {"worker": ["h:99999"]}, "task": {}}), r"'h:99999' \(worker 0\)"),
    (json.dumps({"cluster": {"worker": ["h:1", "h:1"]}, "task": {}}),
     r"h:1 is given twice \(worker 0 and worker 1\)"),
    (json.dumps({"cluster": {"chief": ["a:1", "b:1"]}, "task": {}}), r"2 chief tasks"),
    (json.dumps({"cluster": OK_CLUSTER}), r'"task"=None: must be'),
    (json.dumps({"cluster": OK_CLUSTER, "task": {"type": "chief", "index": 0}}),
     r"task type 'chief' is not a job of the cluster \(jobs: worker\)"),
    (json.dumps({"cluster": OK_CLUSTER, "task": {"type": "worker", "index": 2}}),
     r"task index 2 is out of range: job 'worker' has 2 task\(s\), indices 0..1"),
])
def test_tf_config_errors_are_one_line(text, match):
  with pytest.raises(UsageError, match=match) as e:
    read_tf_config(text)
  assert "\n" not in str(e.value)


def test_tf_config_is_read():
  task = read_tf_config(json.dumps({"cluster": {"chief": ["c:1"], "worker": ["[::1]:2", "w:3"]},
                                    "task": {"type": "worker", "index": 1}}))
  assert task.address == "w:3"
  assert task.peers() == {"chief 0": "c:1", "worker 0": "[::1]:2"}


def test_input_pipelines_take_their_rows_of_every_global_batch():
  """Concatenated, the two pipelines' batches are the unsharded pipeline's global batches -
  the same samples, the same augmentation - and iterating again is a new epoch."""
  make = data.dataset_fn(DATA, "train", batch_size=16, seed=1)
  contexts = [tf.distribute.InputContext(2, i, 2) for i in range(2)]
  whole, _ = data.load(DATA, "train", batch_size=16, seed=1)
  epochs = []
  for _ in range(2):
    parts = [list(make(c).as_numpy_iterator()) for c in contexts]
    full = list(whole.as_numpy_iterator())
    assert len(parts[0]) == len(parts[1]) == len(full) == 2
    for k, batch in enumerate(full):
      for key in ("index", "label", "image"):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key])
    epochs.append(np.concatenate([b["index"] for b in full]))
  assert sorted(epochs[0]) == sorted(epochs[1]) and list(epochs[0]) != list(epochs[1])


def test_config_checks_the_multi_worker_flags():
  base = engine.TrainConfig(method="none", arch="resnet8", dataset=DATA)
  for bad in (0, -1.0, float("nan"), "60", True):
    with pytest.raises(UsageError, match=r"--cluster_timeout=.*must be a number of seconds > 0"):
      cfg.validate(base.replace(cluster_timeout=bad))
  with pytest.raises(UsageError, match=r"--cpu_replicas=2 does not apply to --strategy=multi_"):
    cfg.validate(base.replace(strategy="multi_worker", cpu_replicas=2))
  # How long to wait for the cluster does not change the experiment: a resume may change it.
  settings = [cfg.settings(cfg.validate(base.replace(cluster_timeout=t)))
              for t in (5, 600)]
  assert settings[0] == settings[1] and "cluster_timeout" not in settings[0]
