"""Throughput, memory and start-up time of kd_tf2.data's training pipeline (a benchmark, not a test).

One measurement per process (so that the peak RSS is this pipeline's): builds the ``train``
pipeline, times the ``load`` call and the first batch, then reads ``--batches`` batches and prints
images/s and the peak resident memory (ru_maxrss). Default dataset: the CIFAR-10 JPEG folder at
/tmp/cifar10, extracted from the shared tarball on first use.

  python benchmarks/bench_data.py [--dataset folder:/tmp/cifar10] [--cache auto|memory|none]
      [--image_size S] [--augment auto|imagenet|cifar|none] [--fraction F] [--batch_size 128]
      [--batches N (default: two epochs after the first)] [--views K]
  python benchmarks/bench_data.py --make_jpegs DIR --count 20000 --jpeg_size 400x350
      (writes a folder dataset DIR/train/<10 classes>/*.jpg of random-texture JPEGs; never commit)

Options not given are not passed to ``load`` (so the script also measures older versions).
"""
import argparse
import os
import resource
import sys
import tarfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def make_jpegs(root, count, width, height, classes=10, seed=0):
  """``count`` JPEGs of width x height in root/train/class_<c>/ (and 1 per class in test/)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  # A few smooth random textures, re-encoded with a per-image shift (cheap, realistic sizes).
  bases = [tf.image.resize(rng.uniform(0, 255, (height // 8, width // 8, 3)), [height, width])
           .numpy().astype(np.uint8) for _ in range(8)]
  start = time.perf_counter()
  for split, n in (("train", count), ("test", classes)):
    for c in range(classes):
      os.makedirs(os.path.join(root, split, f"class_{c}"), exist_ok=True)
    for i in range(n):
      image = np.roll(bases[i % len(bases)], shift=int(rng.integers(0, width)), axis=1)
      path = os.path.join(root, split, f"class_{i % classes}", f"{i:06d}.jpg")
      with open(path, "wb") as f:
        f.write(tf.io.encode_jpeg(image, quality=90).numpy())
  print(f"wrote {count} JPEGs {width}x{height} into {root} in {time.perf_counter() - start:.0f} s")


def peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", default="folder:/tmp/cifar10")
  parser.add_argument("--tarball", default=SHARED_TARBALL)
  parser.add_argument("--split", default="train")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--batches", type=int, default=None,
                      help="batches measured after the first (default: two more epochs)")
  parser.add_argument("--fraction", type=float, default=None)
  parser.add_argument("--cache", default=None)
  parser.add_argument("--image_size", type=int, default=None)
  parser.add_argument("--augment", default=None)
  parser.add_argument("--views", type=int, default=None,
                      help="K augmented views of each sample (KDCL's one per net)")
  parser.add_argument("--make_jpegs", default=None, metavar="DIR")
  parser.add_argument("--count", type=int, default=20000)
  parser.add_argument("--jpeg_size", default="400x350", help="WIDTHxHEIGHT")
  args = parser.parse_args()
  if args.make_jpegs:
    width, height = (int(v) for v in args.jpeg_size.split("x"))
    make_jpegs(args.make_jpegs, args.count, width, height)
    return
  ensure_folder(args.dataset, args.tarball)
  import kd_tf2.data  # pylint: disable=import-outside-toplevel

  options = {k: getattr(args, k) for k in ("fraction", "cache", "image_size", "augment", "views")
             if getattr(args, k) is not None}
  options.setdefault("augment", True)
  base_rss = peak_rss_mb()
  start = time.perf_counter()
  ds, info = kd_tf2.data.load(args.dataset, args.split, batch_size=args.batch_size, shuffle=True,
                              drop_remainder=True, **options)
  load_s = time.perf_counter() - start
  it = iter(ds)
  next(it)
  first_s = time.perf_counter() - start
  extra = {k: getattr(info, k) for k in ("style", "cache", "stats") if hasattr(info, k)}
  print(f"{args.dataset} {args.split} {options}: {info.num_examples} images {info.image_shape}, "
        f"{info.num_classes} classes, {extra}")
  print(f"load(): {load_s:.2f} s; first batch after {first_s:.2f} s")
  total = args.batches if args.batches is not None else 3 * info.num_batches - 1
  n, start = 0, time.perf_counter()
  while n < total * args.batch_size:
    try:
      batch = next(it)
    except StopIteration:
      it = iter(ds)
      continue
    n += int(batch["image"].shape[0])
  steady_s = time.perf_counter() - start
  print(f"steady state, batch {args.batch_size}, augment={info.augment}: {n} images in "
        f"{steady_s:.2f} s = {n / steady_s:,.0f} img/s")
  print(f"peak RSS {peak_rss_mb():,.0f} MB (at import of TF and kd_tf2: {base_rss:,.0f} MB)")


if __name__ == "__main__":
  main()
