"""Streaming input (issue 12 items 1-3, DESIGN.md contract 7): listing without decoding, fractions
that decode only their images, cache modes, TFRecord shards, image sizes, ImageNet-style transforms,
per-worker decoding."""
import math
import os

import numpy as np
import pytest
import tensorflow as tf

import kd_tf2.data as data
from kd_tf2 import engine
from kd_tf2.data import pipeline, sources, subset, transforms
from kd_tf2.engine import config as cfg
from kd_tf2.errors import UsageError
from support import make_folder  # noqa: E402


def epoch(ds):
  batches = list(ds.as_numpy_iterator())
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture
def count_decodes(monkeypatch):
  """A list that grows by one per image the pipelines built from now on decode."""
  seen = []
  monkeypatch.setattr(pipeline, "decode_hook", lambda: seen.append(1))
  return seen


# ---------------------------------------------------------------- listing and fractions


def test_folder_listing_is_tfds_image_folder_order(tmp_path):
  """Indices (hence fraction subsets and their fingerprints) are those the tfds ImageFolder
  reader, used before streaming, gave: the same file at every position."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  name = make_folder(str(tmp_path), per_class=(7, 5, 9, 3))
  listed = sources.listing(name, "train")
  assert listed.kind == "files"
  builder = tfds.folder_dataset.ImageFolder(str(tmp_path))
  theirs = [(ex["image/filename"].decode(), int(ex["label"])) for ex in
            builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator()]
  assert [(str(p), int(y)) for p, y in zip(listed.paths, listed.labels)] == theirs
  picked = subset.balanced_subset(listed.labels, listed.class_names, 0.5, seed=3)
  _, info = data.load(name, "train", fraction=0.5, seed=3, batch_size=2)
  assert info.subset_fingerprint == subset.fingerprint(picked)


def test_a_fraction_decodes_only_its_images(tmp_path, count_decodes):
  name = make_folder(str(tmp_path), per_class=(20, 20, 20))
  ds, info = data.load(name, "train", fraction=0.1, seed=1, batch_size=2, cache="none")
  assert info.cache == "none" and info.num_examples == 6
  assert not count_decodes  # building the pipeline decodes nothing
  got = epoch(ds)
  assert len(count_decodes) == 6 and len(got["index"]) == 6
  epoch(ds)
  assert len(count_decodes) == 12  # streamed: decoded again every epoch
  count_decodes.clear()
  ds, info = data.load(name, "train", fraction=0.1, seed=1, batch_size=2)  # auto: small -> memory
  assert info.cache == "memory"
  epoch(ds)
  assert not count_decodes
  # Labels of the subset without decoding anything.
  labels = data.subset_labels(name, "train", fraction=0.1, seed=1)
  assert sorted(np.flatnonzero(labels >= 0)) == sorted(got["index"])
  assert not count_decodes


@pytest.mark.parametrize("augment,image_size", [(None, None), ("imagenet", 16), ("cifar", 6)])
def test_cache_modes_give_identical_batches(tmp_path, augment, image_size):
  name = make_folder(str(tmp_path), per_class=(6, 6), size=(12, 10))
  kwargs = dict(fraction=0.5, seed=2, batch_size=3, augment=augment, image_size=image_size)
  runs = {}
  for cache in ("memory", "none"):
    ds, info = data.load(name, "train", cache=cache, **kwargs)
    runs[cache] = (epoch(ds), epoch(ds), info)
  assert runs["memory"][2].cache == "memory" and runs["none"][2].cache == "none"
  for e in (0, 1):
    for key in ("index", "label", "image"):
      np.testing.assert_array_equal(runs["memory"][e][key], runs["none"][e][key])
  test_runs = [epoch(data.load(name, "test", augment=augment, image_size=image_size,
                               cache=c)[0]) for c in ("memory", "none")]
  np.testing.assert_array_equal(test_runs[0]["image"], test_runs[1]["image"])


def test_memory_path_is_todays_pipeline():
  """In-memory CIFAR-style data streams exactly the batches of the pre-streaming pipeline: the
  index order of a shuffle of the indices themselves, gathered and augmented per batch."""
  name = "synthetic:classes=4,train=64,test=8"
  ds, info = data.load(name, "train", fraction=0.5, seed=5, batch_size=8)
  got = epoch(ds)
  split = sources.read(name, "train")
  indices = subset.balanced_subset(split.labels, split.class_names, 0.5, 5)
  shuffle_seed, augment_seed = pipeline._sub_seeds(5)  # pylint: disable=protected-access
  ref = tf.data.Dataset.from_tensor_slices(indices).shuffle(len(indices), seed=shuffle_seed)
  randoms = tf.data.Dataset.random(seed=augment_seed, rerandomize_each_iteration=True)
  ref = tf.data.Dataset.zip(ref, randoms).batch(8, True)
  for k, (index, randoms) in enumerate(ref.as_numpy_iterator()):
    np.testing.assert_array_equal(got["index"][8 * k:8 * k + 8], index)
    pixels = pipeline.crop_and_flip(tf.constant(split.images[index]), randoms).numpy()
    expected = (pixels / 255.0 - np.array(info.mean)) / np.array(info.std)
    np.testing.assert_allclose(got["image"][8 * k:8 * k + 8], expected, atol=1e-5)


# ---------------------------------------------------------------- TFRecord shards


def write_tfrecords(pattern_dir, split, images, labels, shards=2, fmt="png"):
  files = []
  for s in range(shards):
    path = os.path.join(pattern_dir, f"{split}-{s:05d}-of-{shards:05d}.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
      for i in range(s, len(labels), shards):
        x = tf.constant(images[i], tf.uint8)
        blob = (tf.io.encode_png(x) if fmt == "png" else tf.io.encode_jpeg(x)).numpy()
        example = tf.train.Example(features=tf.train.Features(feature={
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[blob])),
            "image/class/label": tf.train.Feature(
                int64_list=tf.train.Int64List(value=[int(labels[i])]))}))
        writer.write(example.SerializeToString())
    files.append(path)
  return files


def test_tfrecord_shards_stream_their_records(tmp_path, count_decodes):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (30, 7, 7, 3)).astype(np.uint8)
  labels = np.arange(30) % 3
  write_tfrecords(str(tmp_path), "train", images, labels, shards=3)
  write_tfrecords(str(tmp_path), "validation", images[:6], labels[:6], shards=1)
  name = f"tfrecord:{tmp_path}/{{split}}-*"
  listed = sources.listing(name, "train")
  assert listed.kind == "records" and listed.class_names == ("class_0", "class_1", "class_2")
  assert listed.splits == ("train", "validation") and listed.image_shape == (7, 7, 3)
  # Index order: shards interleaved one record at a time, a fixed order; every index's label is
  # the label of the image found there.
  ds, info = data.load(name, "train", fraction=0.4, seed=0, batch_size=4, augment=False,
                       shuffle=False, drop_remainder=False, cache="none")
  got = epoch(ds)
  assert info.class_counts == (4, 4, 4) and len(got["index"]) == 12
  assert len(count_decodes) == 12  # only the subset's records are decoded
  raw = np.rint((got["image"] * info.std + info.mean) * 255).astype(np.uint8)
  for index, label, pixels in zip(got["index"], got["label"], raw):
    (match,) = [i for i in range(30) if np.array_equal(images[i], pixels)]
    assert labels[match] == label == listed.labels[index]
  # Training: shuffled through a buffer, reshuffled each epoch, the same subset.
  ds, info = data.load(name, "train", fraction=0.4, seed=0, batch_size=4, cache="none")
  a, b = epoch(ds), epoch(ds)
  assert sorted(a["index"]) == sorted(b["index"]) == sorted(got["index"])
  assert list(a["index"]) != list(b["index"])
  _, val = data.load(name, "validation")
  assert val.num_examples == 6


def test_tfrecord_errors_are_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"no \{split\}.*accepted: a glob with \{split\}"):
    data.load(f"tfrecord:{tmp_path}/*.tfrecord", "train")
  with pytest.raises(ValueError, match=r"no file matches for any split; accepted"):
    data.check(f"tfrecord:{tmp_path}/{{split}}-*")
  (tmp_path / "train-0.tfrecord").write_bytes(b"this is not a TFRecord file at all")
  with pytest.raises(ValueError, match=r"cannot read its records as tf.train.Example") as e:
    data.load(f"tfrecord:{tmp_path}/{{split}}-*", "train")
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------- sizes, styles, normalisation


def test_style_is_chosen_by_size_and_by_flag():
  small = "synthetic:classes=3,train=12,test=6,size=16"
  large = "synthetic:classes=3,train=12,test=6,size=64"
  _, info = data.load(small, "train", batch_size=4)
  assert info.style == "cifar" and info.image_shape == (16, 16, 3) and info.augment
  _, info = data.load(large, "train", batch_size=4)
  assert info.style == "imagenet" and info.image_shape == (64, 64, 3)
  _, info = data.load(large, "train", batch_size=4, augment="cifar")
  assert info.style == "cifar" and info.augment
  _, info = data.load(large, "train", batch_size=4, augment="none")
  assert info.style == "imagenet" and not info.augment
  ds, info = data.load(small, "test", batch_size=6, image_size=80)
  assert info.style == "imagenet" and info.image_shape == (80, 80, 3)
  assert next(iter(ds))["image"].shape == (6, 80, 80, 3)
  ds, info = data.load(large, "train", batch_size=4, image_size=24, augment=False)
  assert info.style == "cifar" and next(iter(ds))["image"].shape == (4, 24, 24, 3)


def test_mixed_size_folder_trains_at_any_size(tmp_path):
  name = make_folder(str(tmp_path), per_class=(4, 4), sizes=[(70, 90), (100, 66), (80, 80)])
  with pytest.raises(ValueError, match="differ in size; pass image_size"):
    data.load(name, "train", batch_size=2)
  for size in (64, 40):
    ds, info = data.load(name, "train", batch_size=4, image_size=size)
    # imagenet style streams (crops of the full images); cifar style caches the fitted images.
    assert (info.style, info.cache) == (("imagenet", "none") if size >= 64 else ("cifar", "memory"))
    first, second = epoch(ds), epoch(ds)
    assert first["image"].shape == (8, size, size, 3)
    assert not np.array_equal(first["image"], second["image"])  # re-augmented
    test = [epoch(data.load(name, "test", batch_size=3, image_size=size)[0]) for _ in range(2)]
    np.testing.assert_array_equal(test[0]["image"], test[1]["image"])  # evaluation: fixed


def reference_box(h, w, u):
  """torchvision's RandomResizedCrop.get_params, written out, on given uniforms u [10, 4]."""
  area = h * w
  for k in range(10):
    target = area * (0.08 + 0.92 * u[k, 0])
    aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[k, 1])
    cw = round(math.sqrt(target * aspect))
    ch = round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      return (int(u[k, 2] * (h - ch + 1)), int(u[k, 3] * (w - cw + 1)), ch, cw)
  ratio = w / h
  if ratio < 3 / 4:
    cw, ch = w, round(w / (3 / 4))
  elif ratio > 4 / 3:
    ch, cw = h, round(h * 4 / 3)
  else:
    cw, ch = w, h
  return ((h - ch) // 2, (w - cw) // 2, ch, cw)


@pytest.mark.parametrize("h,w", [(350, 400), (64, 64), (10, 300), (300, 12), (5, 7)])
def test_random_resized_crop_box_is_torchvision_rule(h, w):
  areas, ratios = [], []
  for s in range(80):
    seed = tf.constant([s, 1], tf.int64)
    got = [int(v) for v in transforms.random_resized_crop_box(h, w, seed)]
    u = tf.random.stateless_uniform([10, 4], seed=seed).numpy().astype(np.float64)
    assert tuple(got) == reference_box(h, w, u), s
    top, left, ch, cw = got
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    areas.append(ch * cw / (h * w))
    ratios.append(cw / ch)
  if (h, w) == (350, 400):  # a typical photo: the full ranges are drawn
    assert min(areas) < 0.15 and max(areas) > 0.9
    assert min(ratios) < 0.8 and max(ratios) > 1.25


def test_random_resized_crop_output_and_flip():
  image = tf.constant(np.tile(np.arange(50, dtype=np.uint8)[None, :, None], (40, 1, 3)))
  outs = [transforms.random_resized_crop(image, 16, tf.constant(r, tf.int64)).numpy()
          for r in range(40)]
  assert all(o.shape == (16, 16, 3) and o.dtype == np.float32 for o in outs)
  # A left-to-right ramp: some crops come out flipped (decreasing), some not.
  slopes = [np.sign(o[8, -1, 0] - o[8, 0, 0]) for o in outs]
  assert 1 in slopes and -1 in slopes
  np.testing.assert_array_equal(outs[3], transforms.random_resized_crop(
      image, 16, tf.constant(3, tf.int64)).numpy())


def test_eval_resize_and_centre_crop_is_torchvision_rule():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (100, 60, 3)).astype(np.uint8)
  out = transforms.resize_and_centre_crop(tf.constant(image), 32).numpy()
  # Shorter side 60 -> round(32 * 256 / 224) = 37, longer int(37 * 100 / 60) = 61; crop 32 at
  # (round(14.5) = 14, round(2.5) = 2) (round half to even, as Python's round in CenterCrop).
  assert transforms.eval_resize_size(32) == 37 and transforms.eval_resize_size(224) == 256
  resized = tf.image.resize(image, [61, 37], antialias=True).numpy()
  np.testing.assert_array_equal(out, resized[14:46, 2:34])
  assert transforms.resize_and_centre_crop(tf.zeros([300, 400, 3], tf.uint8), 224).shape == (
      224, 224, 3)


def test_normalisation_by_dataset_kind(tmp_path, monkeypatch):
  assert sources.is_imagenet_like("imagenet2012") and sources.is_imagenet_like("imagenette/320px")
  assert not sources.is_imagenet_like("cifar10") and not sources.is_imagenet_like("folder:/in")
  name = make_folder(str(tmp_path), per_class=(10, 10))
  monkeypatch.setattr(sources, "STATS_SAMPLE", 5)
  sources._sampled_stats.cache_clear()  # pylint: disable=protected-access
  _, info = data.load(name, "test")
  assert info.stats == "computed on 5 sampled images"
  listed = sources.listing(name, "train")
  picked = np.sort(np.random.default_rng(0).choice(20, 5, replace=False))
  pixels = np.stack([tf.io.decode_png(tf.io.read_file(p)).numpy() for p in listed.paths[picked]])
  np.testing.assert_allclose(info.mean, pixels.mean(axis=(0, 1, 2)) / 255, rtol=1e-9)
  sources._sampled_stats.cache_clear()  # pylint: disable=protected-access


# ---------------------------------------------------------------- sharding


def test_each_input_pipeline_decodes_only_its_rows(tmp_path, count_decodes):
  name = make_folder(str(tmp_path), per_class=(12, 12, 12), size=(10, 10))
  whole, _ = data.load(name, "train", batch_size=8, seed=3, cache="none")
  full = list(whole.as_numpy_iterator())
  count_decodes.clear()
  make = data.dataset_fn(name, "train", batch_size=8, seed=3)  # cache=auto: streams when sharded
  parts = []
  for i in range(2):
    before = len(count_decodes)
    parts.append(list(make(tf.distribute.InputContext(2, i, 2)).as_numpy_iterator()))
    assert len(count_decodes) - before == 4 * len(full)  # its half of every global batch
  for k, batch in enumerate(full):
    for key in ("index", "label", "image"):
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]),
                                    batch[key])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"augment": "fancy"}, r"augment='fancy' not accepted; accepted: auto, imagenet, cifar, none"),
    ({"image_size": 0}, r"image_size=0 is not accepted; accepted: a positive int"),
    ({"image_size": 2.5}, r"image_size=2.5 is not accepted"),
    ({"cache": "disk"}, r"cache='disk' not accepted; accepted: auto, memory, none"),
    ({"style": "vgg"}, r"style='vgg' not accepted; accepted: auto, imagenet, cifar"),
])
def test_bad_data_options(kwargs, match):
  with pytest.raises(ValueError, match=match) as e:
    data.load("synthetic:train=16,test=4", "train", batch_size=4, **kwargs)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("field,value,match", [
    ("augment", "fancy", r"--augment='fancy': accepted: auto, imagenet, cifar, none"),
    ("cache", "disk", r"--cache='disk': accepted: auto, memory, none"),
    ("image_size", 0, r"--image_size=0: must be an integer >= 1"),
    ("image_size", -3, r"--image_size=-3: must be an integer >= 1"),
])
def test_bad_data_flags(field, value, match):
  base = engine.TrainConfig(method="none", arch="resnet8", dataset="synthetic")
  with pytest.raises(UsageError, match=match):
    cfg.validate(base.replace(**{field: value}))


def test_data_flags_in_settings():
  base = cfg.validate(engine.TrainConfig(method="none", arch="resnet8", dataset="synthetic"))
  plain = cfg.settings(base)
  assert "image_size" not in plain and "augment" not in plain  # old train dirs still resume
  assert "cache" not in cfg.settings(base.replace(cache="none"))  # operational
  assert cfg.settings(base.replace(image_size=64))["image_size"] == 64
  assert cfg.settings(cfg.validate(base.replace(augment="CIFAR")))["augment"] == "cifar"


def test_train_records_the_data_settings(tmp_path):
  """--image_size/--augment reach the pipeline; results.json records the normalisation and the
  image size; evaluation of the export uses the same size."""
  name = "synthetic:classes=3,train=32,test=12,size=8"
  results = engine.train(engine.TrainConfig(
      method="none", arch="resnet8", dataset=name, epochs=1, batch_size=16, image_size=12,
      augment="cifar", cache="none", verbose=False, train_dir=str(tmp_path / "run")))
  split = sources.read(name, "train")
  assert results["image_shape"] == [12, 12, 3] and results["augment_style"] == "cifar"
  assert results["normalization"] == "computed"
  np.testing.assert_allclose(results["mean"], split.pixel_stats[0])
  np.testing.assert_allclose(results["std"], split.pixel_stats[1])
  again = engine.evaluate(str(tmp_path / "run"), name, image_size=12)
  assert again["n"] == 12 and again["top1"] == pytest.approx(results["top1"])
