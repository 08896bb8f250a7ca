"""Helpers shared by several test modules (no tests here; no test module imports another).

Command lines (``run``, ``ok``, ``metrics``, the one-process bad-input driver), generated image
folders, loopback cluster ports, and a small functional Keras classifier of one's own.
"""
import glob
import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
from keras import layers as L
import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "synthetic:train=128,test=64"
COMMON = [f"--dataset={DATA}", "--arch=resnet8", "--teacher_arch=resnet8", "--batch_size=32",
          "--epochs=1"]


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")


def run(script, args, timeout=600):
  return subprocess.run([sys.executable, os.path.join(ROOT, script)] + list(args), cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def last_json(stdout):
  return json.loads(stdout.strip().splitlines()[-1])


def ok(proc):
  assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  assert "Traceback" not in proc.stderr
  return last_json(proc.stdout)


def tensorboard_tags(train_dir):
  """{tag: plugin name} of every summary in the run's own event files (not the teacher's)."""
  tags = {}
  for path in glob.glob(os.path.join(train_dir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags[value.tag] = value.metadata.plugin_data.plugin_name
  return tags


def metrics(train_dir):
  with open(os.path.join(train_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


_DRIVER = textwrap.dedent("""
    import contextlib, importlib.util, io, json, sys, traceback
    script, cases = sys.argv[1], json.loads(sys.argv[2])
    spec = importlib.util.spec_from_file_location("kd_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from kd_tf2 import cli
    name = script.rsplit("/", 1)[-1]
    results = []
    for argv in cases:
      module.FLAGS.unparse_flags()
      err, out, code = io.StringIO(), io.StringIO(), 0
      with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        sys.argv = [name] + argv
        try:
          module.main(cli.flags_parser(module.FLAGS)(sys.argv))
        except SystemExit as e:
          code = e.code
        except BaseException:  # reported, so that the test shows the traceback
          traceback.print_exc()
          code = "crash"
      results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
    print(json.dumps(results))
""")


def _drive(script, cases):
  proc = subprocess.run([sys.executable, "-c", _DRIVER, os.path.join(ROOT, script),
                         json.dumps(cases)], cwd=ROOT, env=_env(), capture_output=True,
                        text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_table_refused(script, table, prefix=()):
  """Run every (argv, pattern) case of ``table`` (after ``prefix``) through ``script`` in one
  process; each must end in one error line matching its pattern."""
  results = _drive(script, [list(prefix) + args for args, _ in table])
  for (_, pattern), result in zip(table, results):
    _assert_one_line_error(result, pattern, script)


def _assert_one_line_error(result, pattern, script):
  import re  # pylint: disable=import-outside-toplevel
  lines = result["stderr"].strip().splitlines()
  assert result["code"] == 2, result
  assert len(lines) == 1 and "Traceback" not in result["stderr"], result["stderr"]
  assert lines[0].startswith(f"{script}: error: "), lines[0]
  assert re.search(pattern, lines[0]), (pattern, lines[0])


def write_image(path, pixels, fmt="png"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = tf.constant(pixels, tf.uint8)
  blob = tf.io.encode_png(pixels) if fmt == "png" else tf.io.encode_jpeg(pixels, quality=95)
  tf.io.write_file(path, blob)


def make_folder(root, per_class=(6, 4, 5), test=2, size=(8, 8), sizes=None, seed=0):
  """root/{train,test}/<class>/*.png of random pixels; ``sizes`` cycles (h, w) per image."""
  rng = np.random.default_rng(seed)
  k = 0
  for split, counts in (("train", per_class), ("test", (test,) * len(per_class))):
    for c, n in enumerate(counts):
      for i in range(n):
        h, w = sizes[k % len(sizes)] if sizes else size
        k += 1
        write_image(os.path.join(root, split, f"c{c}", f"{i:03d}.png"),
                    rng.integers(0, 256, (h, w, 3)))
  return f"folder:{root}"


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


def convnet(widths, classes=10, name="net", softmax=False, size=32):
  """A plain conv net of one's own for size x size images: stage i is conv (stride 1, then 2)-BN-ReLU
  of width widths[i], then global pooling and the classifier (a softmax one with ``softmax``)."""
  x = inp = keras.Input((size, size, 3))
  for i, w in enumerate(widths):
    x = L.Conv2D(w, 3, strides=1 if i == 0 else 2, padding="same", use_bias=False,
                 name=f"conv{i}")(x)
    x = L.BatchNormalization(name=f"bn{i}")(x)
    x = L.ReLU(name=f"relu{i}")(x)
  x = L.GlobalAveragePooling2D(name="pool")(x)
  out = L.Dense(classes, activation="softmax" if softmax else None, name="fc")(x)
  return keras.Model(inp, out, name=name)
