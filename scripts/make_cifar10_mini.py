"""Cut ``cifar10_mini``, the embedded offline dataset, from a CIFAR-10 JPEG image folder.

CIFAR-10: Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", tech. report, 2009.

The source is either the folder ``cifar10/{train,test}/<class>/<n>.jpg`` or the ``.tar.gz`` holding
it. For each class, ``--train_per_class`` train and ``--test_per_class`` test images are chosen by a
permutation seeded with ``--seed``; their original JPEG bytes are stored untouched (no re-encoding)
in one compressed ``.npz`` per split:

  jpeg        uint8 [total_bytes]   every file's bytes, concatenated
  offsets     int64 [N + 1]         file i is jpeg[offsets[i]:offsets[i + 1]]
  label       int64 [N]             index into class_names
  class_names str   [C]             sorted class folder names
  source      str   [N]             the file's path in the source, e.g. "train/cat/0042.jpg"

Images are ordered by class, then by source file name. zlib shares the JPEG headers between files,
so an image costs ~300 bytes instead of ~920.

  python scripts/make_cifar10_mini.py --source /work/shared/data/cifar10-jpeg.tar.gz
"""
import argparse
import os
import tarfile

import numpy as np

OUT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "kd_tf2", "datasets", "cifar10_mini")


def read_source(path):
  """Returns {"train/cat/0042.jpg": bytes, ...} from a CIFAR-10 image folder or its tarball."""
  files = {}
  if os.path.isdir(path):
    for root, _, names in os.walk(path):
      for name in names:
        if name.lower().endswith(".jpg"):
          full = os.path.join(root, name)
          with open(full, "rb") as f:
            files[os.path.relpath(full, path)] = f.read()
  elif tarfile.is_tarfile(path):
    with tarfile.open(path) as tar:
      for member in tar:
        if member.isfile() and member.name.lower().endswith(".jpg"):
          # Drop the leading "cifar10/" so keys start with the split.
          parts = member.name.split("/")
          key = "/".join(parts[parts.index("train") if "train" in parts else parts.index("test"):])
          files[key] = tar.extractfile(member).read()
  else:
    raise FileNotFoundError(f"--source {path!r} is neither a directory nor a tar archive")
  if not files:
    raise FileNotFoundError(f"no .jpg files under --source {path!r}")
  return files


def select(files, split, per_class, seed):
  """Chooses ``per_class`` files of each class of ``split``; returns sorted (class, key) pairs."""
  by_class = {}
  for key in files:
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == split:
      by_class.setdefault(parts[1], []).append(key)
  if not by_class:
    raise ValueError(f"split {split!r} not found in the source")
  chosen = []
  for class_id, name in enumerate(sorted(by_class)):
    keys = sorted(by_class[name])
    if per_class > len(keys):
      raise ValueError(f"{split}/{name} has {len(keys)} images, fewer than {per_class} requested")
    # One generator per (seed, class): a class's choice does not depend on the other classes.
    order = np.random.default_rng([seed, class_id]).permutation(len(keys))
    chosen += [(name, keys[i]) for i in sorted(order[:per_class])]
  return sorted(by_class), chosen


def write_split(files, split, per_class, seed, out_dir):
  class_names, chosen = select(files, split, per_class, seed)
  blobs = [files[key] for _, key in chosen]
  offsets = np.zeros(len(blobs) + 1, np.int64)
  offsets[1:] = np.cumsum([len(b) for b in blobs])
  path = os.path.join(out_dir, f"{split}.npz")
  np.savez_compressed(
      path,
      jpeg=np.frombuffer(b"".join(blobs), np.uint8),
      offsets=offsets,
      label=np.array([class_names.index(name) for name, _ in chosen], np.int64),
      class_names=np.array(class_names),
      source=np.array([key for _, key in chosen]))
  size = os.path.getsize(path)
  print(f"{path}: {len(blobs)} images ({per_class}/class), {size / 1e6:.2f} MB "
        f"({size / len(blobs):.0f} B/image)")
  return size


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--source", default="/work/shared/data/cifar10-jpeg.tar.gz")
  parser.add_argument("--train_per_class", type=int, default=2000)
  parser.add_argument("--test_per_class", type=int, default=500)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out_dir", default=OUT_DIR)
  args = parser.parse_args()
  files = read_source(args.source)
  os.makedirs(args.out_dir, exist_ok=True)
  total = write_split(files, "train", args.train_per_class, args.seed, args.out_dir)
  total += write_split(files, "test", args.test_per_class, args.seed, args.out_dir)
  print(f"total {total / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
