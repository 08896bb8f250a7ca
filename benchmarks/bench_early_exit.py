"""Inference speed of BYOT's early exits (``exit<i>.keras``) against the full net.

Usage: python benchmarks/bench_early_exit.py [--arch resnet32] [--batch_size 128] [--steps 10]
                                             [--rounds 3] [--num_classes 100]

Builds BYOT on an untrained ``--arch`` with every exit (``early_exit="all"``), exports the exits as
the engine does, and times ``model(images, training=False)`` under ``tf.function`` for the full net
and each exit on one fixed random batch. Rounds interleave the models, so a load change on a shared
machine hits all of them; the best round counts. Prints a table, then one JSON line:
{name: {"images_per_sec", "params", "x_full"}} (x_full: the speed-up over the full net).
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import nets  # noqa: E402
from kd_tf2 import distillers  # noqa: E402


def seconds_per_batch(fn, images, steps):
  start = time.perf_counter()
  for _ in range(steps):
    out = fn(images)
  _ = out.numpy()
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="resnet32")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--num_classes", type=int, default=100)
  args = parser.parse_args()

  shape = (32, 32, 3)
  student = nets.create(args.arch, args.num_classes)
  student.build((None,) + shape)
  byot = distillers.create("BYOT", student, None, input_shape=shape, early_exit="all")
  models = {"full": student, **byot.extra_exports()}
  fns = {name: tf.function(lambda x, m=m: m(x, training=False)) for name, m in models.items()}
  images = tf.constant(np.random.default_rng(0).normal(size=(args.batch_size,) + shape),
                       tf.float32)
  for fn in fns.values():  # trace and warm up
    seconds_per_batch(fn, images, 2)
  best = {name: float("inf") for name in fns}
  for _ in range(args.rounds):
    for name, fn in fns.items():
      best[name] = min(best[name], seconds_per_batch(fn, images, args.steps))
  out = {}
  for name, model in models.items():
    out[name] = {"images_per_sec": round(args.batch_size / best[name], 1),
                 "params": int(sum(int(np.prod(v.shape)) for v in model.weights)),
                 "x_full": round(best["full"] / best[name], 2)}
  print(f"{args.arch}, batch {args.batch_size}, inference (training=False):")
  for name, row in out.items():
    print(f"  {name:6s} {row['images_per_sec']:9.1f} images/s  {row['params']:9d} weights  "
          f"{row['x_full']:.2f}x the full net")
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
