"""Two real workers over 127.0.0.1 (MultiWorkerMirroredStrategy, one replica each) stream a folder
through ``distribute_datasets_from_function(kd_tf2.data.dataset_fn(...))``: each decodes only its
half of every global batch (counted by ``pipeline.decode_hook``), and the two halves side by side
are the one-device pipeline's global batches (issue 12 item 2)."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

import kd_tf2.data as data
from support import make_folder
from support import free_ports, tf_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240
WORKER = r"""
import json, sys
from kd_tf2 import cli
cli.start_tensorflow(strategy="multi_worker", cluster_timeout=60)
from kd_tf2.engine.strategy import make_strategy
from kd_tf2 import data
from kd_tf2.data import pipeline
strategy = make_strategy("multi_worker", cluster_timeout=60)
import tensorflow as tf
tf.random.set_seed(7)  # the shuffle and augmentation seeds depend on TF's global seed too
seen = []
pipeline.decode_hook = lambda: seen.append(1)
make = data.dataset_fn(sys.argv[1], "train", batch_size=8, seed=3, image_size=int(sys.argv[2]))
batches = []
for epoch in range(2):
  for batch in strategy.distribute_datasets_from_function(make):
    (index,) = strategy.experimental_local_results(batch["index"])
    (image,) = strategy.experimental_local_results(batch["image"])
    batches.append({"index": index.numpy().tolist(), "sum": float(image.numpy().sum())})
print(json.dumps({"decodes": len(seen), "batches": batches}), flush=True)
"""


@pytest.mark.parametrize("image_size", [64])  # imagenet style (cifar style: test_data_streaming)
def test_two_workers_each_decode_half(tmp_path, image_size):
  name = make_folder(str(tmp_path / "data"), per_class=(12, 12, 12), size=(10, 12))
  ports = free_ports(2)
  procs = []
  for i in range(2):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
               TF_CONFIG=tf_config(ports, i))
    procs.append(subprocess.Popen([sys.executable, "-c", WORKER, name, str(image_size)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True))
  killer = threading.Timer(TIMEOUT, lambda: [p.kill() for p in procs if p.poll() is None])
  killer.start()
  try:
    outputs = [p.communicate() for p in procs]
  finally:
    killer.cancel()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
  workers = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

  tf.random.set_seed(7)  # as the workers: other tests of this process may have set another
  whole, info = data.load(name, "train", batch_size=8, seed=3, image_size=image_size)
  full = list(whole.as_numpy_iterator()) + list(whole.as_numpy_iterator())  # two epochs
  assert info.num_batches == 4 and len(full) == 8
  for w in workers:
    assert w["decodes"] == 4 * len(full)  # 32 images a worker: half of the 64 streamed
    assert [len(b["index"]) for b in w["batches"]] == [4] * len(full)
  for k, batch in enumerate(full):
    got = workers[0]["batches"][k]["index"] + workers[1]["batches"][k]["index"]
    assert got == batch["index"].tolist(), k
    sums = [workers[i]["batches"][k]["sum"] for i in range(2)]
    np.testing.assert_allclose(sums, [batch["image"][:4].sum(), batch["image"][4:].sum()],
                               rtol=1e-5)
