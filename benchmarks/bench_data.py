"""Throughput of kd_tf2.data's training pipeline (a benchmark, not a test).

Prints the one-time cost of decoding a split into the in-memory uint8 cache, then the pipeline's
augmented images/s (pad + crop + flip, normalise, batch) after a warm-up, measured over whole
epochs. Default: the CIFAR-10 JPEG folder at /tmp/cifar10, extracted from the shared tarball on
first use.

  python benchmarks/bench_data.py [--dataset folder:/tmp/cifar10] [--batch_size 128] [--epochs 2]
"""
import argparse
import os
import sys
import tarfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kd_tf2.data  # noqa: E402  pylint: disable=g-import-not-at-top

SHARED_TARBALL = "/work/shared/data/cifar10-jpeg.tar.gz"


def ensure_folder(dataset, tarball):
  """Extracts the tarball (which holds cifar10/) next to a missing ``folder:`` path."""
  if not dataset.startswith("folder:"):
    return
  root = dataset[len("folder:"):]
  if os.path.isdir(root):
    return
  if not os.path.isfile(tarball):
    sys.exit(f"{root} does not exist and the tarball {tarball} is absent")
  print(f"extracting {tarball} into {os.path.dirname(root) or '.'} ...", flush=True)
  with tarfile.open(tarball) as tar:
    tar.extractall(os.path.dirname(root) or ".", filter="data")


def run_epoch(ds):
  images = 0
  for batch in ds:
    images += int(batch["image"].shape[0])
  return images


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="folder:/tmp/cifar10")
  parser.add_argument("--tarball", default=SHARED_TARBALL)
  parser.add_argument("--split", default="train")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--epochs", type=int, default=2, help="measured epochs after the warm-up one")
  parser.add_argument("--no_augment", action="store_true")
  args = parser.parse_args()
  ensure_folder(args.dataset, args.tarball)

  start = time.perf_counter()
  ds, info = kd_tf2.data.load(args.dataset, args.split, batch_size=args.batch_size,
                              augment=not args.no_augment, shuffle=True, drop_remainder=True)
  cache_s = time.perf_counter() - start
  print(f"{args.dataset} {args.split}: {info.num_examples} images {info.image_shape}, "
        f"{info.num_classes} classes, mean {tuple(round(m, 4) for m in info.mean)} "
        f"std {tuple(round(s, 4) for s in info.std)}")
  print(f"decode + cache (first load): {cache_s:.2f} s = {info.num_examples / cache_s:,.0f} img/s")

  start = time.perf_counter()
  n = run_epoch(ds)
  warm_s = time.perf_counter() - start
  print(f"first epoch (warm-up): {warm_s:.2f} s = {n / warm_s:,.0f} img/s")

  start = time.perf_counter()
  n = sum(run_epoch(ds) for _ in range(args.epochs))
  steady_s = time.perf_counter() - start
  print(f"steady state, batch {args.batch_size}, augment={info.augment}: {n} images in "
        f"{steady_s:.2f} s = {n / steady_s:,.0f} img/s")


if __name__ == "__main__":
  main()
