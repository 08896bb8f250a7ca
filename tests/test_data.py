"""Tests of kd_tf2.data (issue 4, DESIGN.md contract 4)."""
import os
import tarfile
import time

import numpy as np
import pytest
import tensorflow as tf

import kd_tf2.data as data
from kd_tf2.data import pipeline, sources, subset

SHARED_TARBALL = "/work/shared/data/cifar10-jpeg.tar.gz"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
SYN = "synthetic:classes=5,train=200,test=60"


def epoch(ds):
  """All batches of one pass, concatenated per key (numpy)."""
  batches = list(ds.as_numpy_iterator())
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def write_png(path, pixels):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tf.io.write_file(path, tf.io.encode_png(tf.constant(pixels, tf.uint8)))


# ---------------------------------------------------------------- fractions


def test_balanced_subset_counts_round_half_up_and_keep_one():
  labels = np.array([0] * 3 + [1] * 10 + [2] * 5)
  rng = np.random.default_rng(5)
  labels = labels[rng.permutation(len(labels))]
  kept = subset.balanced_subset(labels, ["a", "b", "c"], 0.5, seed=3)
  # 0.5 * (3, 10, 5) = (1.5, 5, 2.5) -> (2, 5, 3) rounding half up (Python's round gives 2.5 -> 2).
  assert np.bincount(labels[kept], minlength=3).tolist() == [2, 5, 3]
  kept = subset.balanced_subset(labels, ["a", "b", "c"], 0.01, seed=3)
  assert np.bincount(labels[kept], minlength=3).tolist() == [1, 1, 1]
  assert len(np.unique(kept)) == len(kept)


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.1])
def test_fraction_is_class_balanced_through_load(fraction):
  ds, info = data.load(SYN, "train", fraction=fraction, batch_size=16, shuffle=False,
                       augment=False, drop_remainder=False)
  expected = int(np.floor(fraction * 40 + 0.5))  # 200 images over 5 classes: 40 each
  assert info.class_counts == (expected,) * 5
  assert info.num_examples == 5 * expected
  assert info.split_size == 200
  got = epoch(ds)
  assert len(got["index"]) == info.num_examples
  assert np.bincount(got["label"], minlength=5).tolist() == [expected] * 5
  full = sources.read(SYN, "train")
  np.testing.assert_array_equal(full.labels[got["index"]], got["label"])


def kept_indices(seed, fraction=0.25, batch_size=16, name=SYN):
  ds, _ = data.load(name, "train", fraction=fraction, seed=seed, batch_size=batch_size,
                    drop_remainder=False)
  return np.sort(epoch(ds)["index"])


def test_fraction_is_seed_deterministic_and_independent_of_batch_size():
  a = kept_indices(seed=1)
  np.testing.assert_array_equal(a, kept_indices(seed=1))
  np.testing.assert_array_equal(a, kept_indices(seed=1, batch_size=7))
  assert not np.array_equal(a, kept_indices(seed=2))


def test_test_split_is_never_subsampled():
  ds, info = data.load(SYN, "test", fraction=0.1, batch_size=16)
  assert info.num_examples == info.split_size == 60
  got = epoch(ds)
  np.testing.assert_array_equal(got["index"], np.arange(60))  # evaluation: in order, no drop


# ---------------------------------------------------------------- batches and epochs


def test_batch_format_and_drop_remainder():
  ds, info = data.load(SYN, "train", batch_size=64)
  batches = list(ds)
  assert len(batches) == info.num_batches == 200 // 64
  for b in batches:
    assert set(b) == {"image", "label", "index"}
    assert b["image"].dtype == tf.float32 and b["image"].shape == (64, 32, 32, 3)
    assert b["label"].dtype == tf.int64 and b["label"].shape == (64,)
    assert b["index"].dtype == tf.int64 and b["index"].shape == (64,)
  ds, info = data.load(SYN, "test", batch_size=64)
  sizes = [int(b["image"].shape[0]) for b in ds]
  assert sizes == [60] and info.num_batches == 1 and not info.augment


def test_evaluation_images_are_normalised_raw_pixels():
  ds, info = data.load("cifar10_mini", "test", batch_size=100)
  assert info.mean == CIFAR10_MEAN and info.std == CIFAR10_STD
  batch = next(iter(ds.as_numpy_iterator()))
  raw = sources.read("cifar10_mini", "test").images[batch["index"]].astype(np.float32) / 255.0
  expected = (raw - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
  np.testing.assert_allclose(batch["image"], expected, atol=1e-5)


def test_computed_normalisation_matches_numpy():
  _, info = data.load(SYN, "test")  # synthetic has no reference values: computed on train
  train = sources.read(SYN, "train").images.astype(np.float64) / 255.0
  np.testing.assert_allclose(info.mean, train.mean(axis=(0, 1, 2)), rtol=1e-9)
  np.testing.assert_allclose(info.std, train.std(axis=(0, 1, 2)), rtol=1e-9)


def test_epochs_reshuffle_and_reaugment_but_runs_repeat():
  def two_epochs():
    ds, _ = data.load(SYN, "train", seed=4, batch_size=50)
    return epoch(ds), epoch(ds)
  first, second = two_epochs()
  assert not np.array_equal(first["index"], second["index"])
  assert sorted(first["index"]) == sorted(second["index"])
  again, _ = two_epochs()
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])


# ---------------------------------------------------------------- augmentation


def reference_crop_flip(images, randoms, pad=4):
  """Straightforward numpy version of pad + crop + flip, decoding ``randoms`` the same way."""
  n, h, w, _ = images.shape
  padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
  out = np.empty_like(images)
  span = 2 * pad + 1
  for i, r in enumerate(randoms):
    top, left, flip = r % span, (r // span) % span, (r // span ** 2) % 2
    crop = padded[i, top:top + h, left:left + w]
    out[i] = crop[:, ::-1] if flip else crop
  return out


def test_crop_and_flip_matches_reference():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (200, 32, 32, 3)).astype(np.uint8)
  randoms = rng.integers(0, 2 ** 62, 200)
  got = pipeline.crop_and_flip(tf.constant(images), tf.constant(randoms, tf.int64)).numpy()
  np.testing.assert_array_equal(got, reference_crop_flip(images, randoms))
  # Over 200 draws every offset and both flips occur.
  assert set(randoms % 9) == set(range(9)) and set((randoms // 81) % 2) == {0, 1}
  # A non-square, single-channel batch keeps its shape.
  odd = pipeline.crop_and_flip(tf.zeros([2, 28, 20, 1], tf.uint8), tf.constant([5, 700], tf.int64))
  assert odd.shape == (2, 28, 20, 1)


def test_augmented_batches_shape_range_and_content():
  ds, info = data.load("cifar10_mini", "train", fraction=0.05, batch_size=100, seed=0)
  batch = next(iter(ds.as_numpy_iterator()))
  mean, std = np.array(info.mean), np.array(info.std)
  assert batch["image"].shape == (100, 32, 32, 3)
  pixels = batch["image"] * std + mean
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  raw = sources.read("cifar10_mini", "train").images[batch["index"]]
  # Each augmented image is one of the 18 pad-crop-flip variants of its raw image.
  variants = [reference_crop_flip(raw, np.full(len(raw), r)) for r in range(162)]
  quantised = np.rint(pixels * 255).astype(np.uint8)
  matches = np.stack([(quantised == v).all(axis=(1, 2, 3)) for v in variants])
  assert matches.any(axis=0).all()
  assert (~matches[40]).any()  # and not all of them are the identity (offset 4, 4, no flip)


# ---------------------------------------------------------------- synthetic, distribution


def test_synthetic_is_deterministic_fast_and_learnable():
  start = time.perf_counter()
  from kd_tf2.data import synthetic
  x1, y1 = synthetic.generate("train", **synthetic.DEFAULTS)
  assert time.perf_counter() - start < 1.0
  x2, y2 = synthetic.generate("train", **synthetic.DEFAULTS)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(y1, y2)
  # Linear probe (ridge regression onto one-hot labels) trained on train, scored on test.
  tr, tr_info = data.load("synthetic", "train", augment=False, drop_remainder=False)
  te, _ = data.load("synthetic", "test")
  tr, te = epoch(tr), epoch(te)
  x, xt = tr["image"].reshape(len(tr["image"]), -1), te["image"].reshape(len(te["image"]), -1)
  targets = np.eye(tr_info.num_classes)[tr["label"]]
  alpha = np.linalg.solve(x @ x.T + 10.0 * np.eye(len(x)), targets)
  accuracy = np.mean(np.argmax(xt @ (x.T @ alpha), axis=1) == te["label"])
  assert accuracy > 0.5  # chance is 0.1


def test_dataset_fn_shards_and_splits_the_global_batch():
  make = data.dataset_fn(SYN, "test", batch_size=20)
  seen = []
  for pipeline_id in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=2)
    batches = list(make(context).as_numpy_iterator())
    assert {len(b["index"]) for b in batches[:-1]} == {10}
    seen.append(np.concatenate([b["index"] for b in batches]))
  assert not set(seen[0]) & set(seen[1])
  assert sorted(np.concatenate(seen)) == list(range(60))


# ---------------------------------------------------------------- folders and errors


def test_folder_dataset_reads_pixels_exactly(tmp_path):
  rng = np.random.default_rng(0)
  written = {}
  for split, n in (("train", 4), ("test", 2)):
    for cls in ("cat", "ant"):
      for i in range(n):
        pixels = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
        write_png(str(tmp_path / split / cls / f"{i}.png"), pixels)
        written.setdefault(split, []).append((cls, pixels))
  ds, info = data.load(f"folder:{tmp_path}", "train", batch_size=3, drop_remainder=False,
                       augment=False, shuffle=False)
  assert info.class_names == ("ant", "cat") and info.class_counts == (4, 4)
  assert info.image_shape == (8, 8, 3) and info.splits == ("test", "train")
  all_train = np.stack([p for _, p in written["train"]]).astype(np.float64) / 255
  np.testing.assert_allclose(info.mean, all_train.mean(axis=(0, 1, 2)), rtol=1e-9)
  got = epoch(ds)
  raw = np.rint((got["image"] * info.std + info.mean) * 255).astype(np.uint8)
  for pixels, label in zip(raw, got["label"]):
    matches = [cls for cls, p in written["train"] if np.array_equal(p, pixels)]
    assert matches == [info.class_names[label]]
  _, test_info = data.load(f"folder:{tmp_path}", "test")
  assert test_info.mean == info.mean and test_info.class_counts == (2, 2)


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    data.load(f"folder:{tmp_path / 'nowhere'}", "train")
  pixels = np.zeros((4, 4, 3), np.uint8)
  for split, cls in (("train", "a"), ("train", "b"), ("test", "a"), ("test", "c")):
    write_png(str(tmp_path / "differ" / split / cls / "0.png"), pixels)
  with pytest.raises(ValueError, match="classes differ") as error:
    data.load(f"folder:{tmp_path / 'differ'}", "train")
  assert "['b']" in str(error.value) and "['c']" in str(error.value)
  write_png(str(tmp_path / "empty" / "train" / "a" / "0.png"), pixels)
  os.makedirs(tmp_path / "empty" / "train" / "b")
  with pytest.raises(ValueError, match="train/b is empty"):
    data.load(f"folder:{tmp_path / 'empty'}", "train")
  write_png(str(tmp_path / "ok" / "train" / "a" / "0.png"), pixels)
  with pytest.raises(ValueError, match=r"'val'.*\['train'\]"):
    data.load(f"folder:{tmp_path / 'ok'}", "val")


def test_folder_of_mixed_sizes_needs_image_size(tmp_path):
  write_png(str(tmp_path / "train" / "a" / "0.png"), np.full((10, 20, 3), 200, np.uint8))
  write_png(str(tmp_path / "train" / "b" / "0.png"), np.full((12, 12, 3), 100, np.uint8))
  with pytest.raises(ValueError, match="image_size"):
    data.load(f"folder:{tmp_path}", "train", batch_size=1)
  ds, info = data.load(f"folder:{tmp_path}", "train", batch_size=2, image_size=6, augment=False,
                       shuffle=False)
  assert info.image_shape == (6, 6, 3)
  raw = np.rint((epoch(ds)["image"] * info.std + info.mean) * 255)
  assert sorted(np.unique(raw).tolist()) == [100, 200]  # constant images stay constant


@pytest.mark.parametrize("fraction", [0, -0.5, 1.01, float("nan"), "half", True])
def test_bad_fraction(fraction):
  with pytest.raises(ValueError, match=r"fraction.*\(0, 1\]"):
    data.load(SYN, "train", fraction=fraction)


def test_class_without_samples_cannot_be_subsampled():
  with pytest.raises(ValueError, match=r"\['c'\]"):
    subset.balanced_subset(np.array([0, 0, 1, 1]), ["a", "b", "c"], 0.5, seed=0)


def test_unknown_names_splits_and_options():
  with pytest.raises(ValueError, match="no_such_dataset_xyz.*cifar10_mini.*folder:PATH"):
    data.load("no_such_dataset_xyz", "train")
  with pytest.raises(ValueError, match="'validation'.*'train', 'test'"):
    data.load("cifar10_mini", "validation")
  with pytest.raises(ValueError, match="colours"):
    data.load("synthetic:colours=3", "train")
  with pytest.raises(ValueError, match="batch_size=0"):
    data.load(SYN, "train", batch_size=0)
  with pytest.raises(ValueError, match="batch_size=500 exceeds"):
    data.load(SYN, "train", batch_size=500)


def test_tfds_without_data_fails_fast_offline(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_network_reachable", lambda: False)
  start = time.perf_counter()
  with pytest.raises(FileNotFoundError) as error:
    data.load("cifar10", "train", data_dir=str(tmp_path))
  message = str(error.value)
  assert time.perf_counter() - start < 20
  assert "\n" not in message
  for alternative in ("cifar10", "data_dir", "folder:PATH", "cifar10_mini"):
    assert alternative in message
  monkeypatch.undo()
  start = time.perf_counter()
  sources._network_reachable()  # the real probe returns within its timeout
  assert time.perf_counter() - start < 10


def test_available_names():
  names = data.available()
  assert {"cifar10_mini", "synthetic", "folder:PATH"} <= set(names)


# ---------------------------------------------------------------- embedded and shared CIFAR-10


def test_cifar10_mini_is_balanced_cifar10():
  _, train = data.load("cifar10_mini", "train")
  _, test = data.load("cifar10_mini", "test")
  assert train.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                               "horse", "ship", "truck")
  assert train.class_counts == (2000,) * 10 and test.class_counts == (500,) * 10
  assert train.image_shape == (32, 32, 3)


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory):
  """A few real CIFAR-10 files from the shared tarball: some in cifar10_mini, a small folder."""
  if not os.path.isfile(SHARED_TARBALL):
    pytest.skip(f"shared CIFAR-10 absent ({SHARED_TARBALL})")
  root = tmp_path_factory.mktemp("cifar")
  with np.load(os.path.join(sources.EMBEDDED_DIR, "test.npz")) as mini:
    picked = {str(s): i for i, s in enumerate(mini["source"]) if i % 500 < 3}
  per_class = {}
  with tarfile.open(SHARED_TARBALL) as tar:
    for member in tar:
      parts = member.name.split("/")
      if not member.isfile() or len(parts) < 3:
        continue
      key = "/".join(parts[-3:])  # split/class/file
      bucket = per_class.setdefault(tuple(parts[-3:-1]), [])
      if key in picked or len(bucket) < 6:
        tar.extract(member, root, filter="data")
        bucket.append(key)
  folder = os.path.join(root, *member.name.split("/")[:-3])
  return folder, picked


def test_cifar10_mini_holds_the_real_images(cifar_subset):
  folder, picked = cifar_subset
  mini = sources.read("cifar10_mini", "test")
  for key, position in picked.items():
    decoded = tf.io.decode_jpeg(tf.io.read_file(os.path.join(folder, key)), channels=3).numpy()
    np.testing.assert_array_equal(mini.images[position], decoded)
    assert mini.class_names[mini.labels[position]] == key.split("/")[1]


def test_folder_on_real_cifar10(cifar_subset):
  folder, _ = cifar_subset
  ds, info = data.load(f"folder:{folder}", "train", fraction=0.5, batch_size=10)
  assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
  assert info.class_counts == (3,) * 10
  assert all(b["image"].shape == (10, 32, 32, 3) for b in ds)


# ---------------------------------------------------------------- tfds datasets


def test_tfds_dataset_read_from_data_dir(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class KdTf2TinyImages(tfds.core.GeneratorBasedBuilder):
    """Prepared offline into tmp_path, then read back through data.load like any tfds name."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(6, 6, 3)),
              "label": tfds.features.ClassLabel(names=["x", "y", "z"])}),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(30, 1), "test": self._generate_examples(9, 2)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield i, {"image": rng.integers(0, 256, (6, 6, 3)).astype(np.uint8), "label": i % 3}

  builder = KdTf2TinyImages(data_dir=str(tmp_path / "prepared"))
  builder.download_and_prepare()
  expected = {int(y): 0 for y in range(3)}
  for example in builder.as_dataset(split="train").as_numpy_iterator():
    expected[int(example["label"])] += 1

  ds, info = data.load("kd_tf2_tiny_images", "train", fraction=0.5, batch_size=4,
                       data_dir=str(tmp_path / "prepared"))
  assert info.class_names == ("x", "y", "z") and info.splits == ("test", "train")
  assert info.split_size == 30 and info.image_shape == (6, 6, 3)
  assert info.class_counts == tuple(int(np.floor(0.5 * n + 0.5)) for n in expected.values())
  assert all(b["image"].shape == (4, 6, 6, 3) for b in ds)
  # Streamed from the prepared shards (image bytes decoded in the pipeline) or decoded once into
  # memory: the same batches; the label at every index is the one tfds stores there.
  assert info.cache == "memory"
  streamed, s_info = data.load("kd_tf2_tiny_images", "train", fraction=0.5, batch_size=4,
                               data_dir=str(tmp_path / "prepared"), cache="none")
  assert s_info.cache == "none"
  cached, _ = data.load("kd_tf2_tiny_images", "train", fraction=0.5, batch_size=4,
                        data_dir=str(tmp_path / "prepared"))
  got, want = epoch(streamed), epoch(cached)
  for key in ("index", "label", "image"):
    np.testing.assert_array_equal(got[key], want[key])
  stored = [int(ex["label"]) for ex in builder.as_dataset(split="train", shuffle_files=False)
            .as_numpy_iterator()]
  assert [stored[i] for i in got["index"]] == got["label"].tolist()

  monkeypatch.setattr(sources, "_network_reachable", lambda: False)
  with pytest.raises(FileNotFoundError, match="kd_tf2_tiny_images.*not prepared"):
    data.load("kd_tf2_tiny_images", "train", data_dir=str(tmp_path / "elsewhere"))
  with pytest.raises(ValueError, match="imdb_reviews.*not an image-classification"):
    data.load("imdb_reviews", "train", data_dir=str(tmp_path / "elsewhere"))
