"""``views=K``: K augmentations of each training sample's one image (KDCL's one view per net).

Every view is a crop/flip of the sample's own image (a different image would fail the checks),
views differ from each other, view 0 is the image of the pipeline without views, and the views
follow the seed, the epochs, the fast-forward of a resumed run, both cache modes, the per-image
(streamed) path, sharded input pipelines and the engine's request (``batch_views``)."""
import os

import numpy as np
import pytest
import tensorflow as tf

import kd_tf2.data as data
from kd_tf2 import distillers
from kd_tf2.data import sources
from kd_tf2.engine import config as cfg
from kd_tf2.engine import run as engine_run
from support import make_folder, write_image
from test_data import reference_crop_flip

SYN = "synthetic:classes=5,train=40,test=10"


def epoch(ds):
  batches = list(ds.as_numpy_iterator())
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def raw_pixels(views, info):
  """Normalised float views -> the uint8 pixels they were made from."""
  return np.rint((views * np.array(info.std) + np.array(info.mean)) * 255).astype(np.int64)


def test_each_view_is_a_crop_and_flip_of_the_samples_image():
  ds, info = data.load("cifar10_mini", "train", fraction=0.02, batch_size=20, seed=0, views=3)
  b = next(iter(ds.as_numpy_iterator()))
  assert b["views"].shape == (20, 3, 32, 32, 3) and info.views == 3
  np.testing.assert_array_equal(b["image"], b["views"][:, 0])
  plain = next(iter(data.load("cifar10_mini", "train", fraction=0.02, batch_size=20,
                              seed=0)[0].as_numpy_iterator()))
  np.testing.assert_array_equal(plain["image"], b["image"])  # view 0: today's image
  raw = sources.read("cifar10_mini", "train").images[b["index"]]
  variants = np.stack([reference_crop_flip(raw, np.full(len(raw), r)) for r in range(162)])
  for k in range(3):
    pixels = raw_pixels(b["views"][:, k], info)
    matches = (variants == pixels[None]).all(axis=(2, 3, 4))  # [162, B]
    assert matches.any(axis=0).all(), k  # one of the crops/flips of its own raw image
  assert (b["views"][:, 1] != b["views"][:, 0]).any(axis=(1, 2, 3)).mean() > 0.5
  assert (b["views"][:, 2] != b["views"][:, 1]).any(axis=(1, 2, 3)).mean() > 0.5
  same, _ = data.load("cifar10_mini", "train", fraction=0.02, batch_size=20, seed=0, views=3,
                      augment=False)
  s = next(iter(same.as_numpy_iterator()))
  for k in range(3):
    np.testing.assert_array_equal(s["views"][:, k], s["image"])
  np.testing.assert_array_equal(raw_pixels(s["image"], info),
                                sources.read("cifar10_mini", "train").images[s["index"]])


def colour_folder(root, n=6, size=(12, 10)):
  """Two classes of n constant-colour images; the colour of file c/i is (40*c + 7*i + 20, 3*i + 9,
  200 - 11*i): every crop, flip or resize of an image keeps its colour, no two images share it."""
  for c in range(2):
    for i in range(n):
      for split in ("train", "test"):
        pixels = np.empty(size + (3,), np.uint8)
        pixels[...] = colour(c, i)
        write_image(os.path.join(root, split, f"c{c}", f"{i:03d}.png"), pixels)
  return f"folder:{root}"


def colour(c, i):
  return (40 * c + 7 * i + 20, 3 * i + 9, 200 - 11 * i)


@pytest.mark.parametrize("cache", ["memory", "none"])
@pytest.mark.parametrize("augment,image_size", [("cifar", 8), ("imagenet", 16)])
def test_views_hold_only_their_samples_colour_in_every_path(tmp_path, cache, augment,
                                                            image_size):
  name = colour_folder(str(tmp_path))
  ds, info = data.load(name, "train", batch_size=4, seed=1, views=2, cache=cache,
                       augment=augment, image_size=image_size)
  assert info.cache == cache and info.style == augment
  got = epoch(ds)
  paths = sources.listing(name, "train").paths
  borders = 0
  for views, index in zip(got["views"], got["index"]):
    path = str(paths[index])
    want = colour(int(os.path.basename(os.path.dirname(path))[1:]),
                  int(os.path.basename(path)[:3]))
    pixels = raw_pixels(views, info)  # [2, S, S, 3]
    is_colour = (pixels == np.array(want)).all(-1)
    if augment == "imagenet":
      assert is_colour.all()
    else:  # pad-crop: its colour or the zero padding, nothing else
      assert (is_colour | (pixels == 0).all(-1)).all() and is_colour.any(axis=(1, 2)).all()
      borders += int((is_colour[0] != is_colour[1]).any())
  if augment == "cifar":
    assert borders >= len(got["index"]) // 2  # the two views are cropped differently


@pytest.mark.parametrize("augment,image_size", [("cifar", 6), ("imagenet", 16)])
def test_views_are_the_same_in_both_cache_modes(tmp_path, augment, image_size):
  name = make_folder(str(tmp_path), per_class=(6, 6), size=(12, 10))
  kwargs = dict(fraction=0.5, seed=2, batch_size=3, augment=augment, image_size=image_size)
  runs = {}
  for cache in ("memory", "none"):
    ds, _ = data.load(name, "train", cache=cache, views=2, **kwargs)
    runs[cache] = (epoch(ds), epoch(ds))
  plain, _ = data.load(name, "train", cache="none", **kwargs)
  np.testing.assert_array_equal(epoch(plain)["image"], runs["none"][0]["image"])
  for e in (0, 1):
    for key in ("index", "image", "views"):
      np.testing.assert_array_equal(runs["memory"][e][key], runs["none"][e][key])
    v = runs["none"][e]["views"]
    assert (v[:, 0] != v[:, 1]).any(axis=(1, 2, 3)).all()  # random crops of random pixels
  assert not np.array_equal(runs["none"][0]["views"], runs["none"][1]["views"])


def test_views_follow_the_seed_and_a_resumed_runs_fast_forward():
  def build(seed=4):
    return data.load(SYN, "train", batch_size=10, seed=seed, views=2)[0]
  ds = build()
  epochs = [epoch(ds) for _ in range(3)]
  assert not np.array_equal(epochs[1]["views"], epochs[2]["views"])
  again = build()
  for _ in range(2):  # the engine's fast-forward: create (and drop) an iterator per done epoch
    iter(again)
  resumed = epoch(again)
  for key in epochs[2]:
    np.testing.assert_array_equal(resumed[key], epochs[2][key])
  other = epoch(build(seed=5))
  assert not np.array_equal(other["views"], epochs[0]["views"])


def test_sharded_input_pipelines_split_the_views_by_rows():
  whole = next(iter(data.load(SYN, "train", batch_size=10, seed=6, views=2)[0]))
  make = data.dataset_fn(SYN, "train", batch_size=10, seed=6, views=2)
  parts = [next(iter(make(tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i,
                                                     num_replicas_in_sync=2))))
           for i in range(2)]
  assert parts[0]["views"].shape == (5, 2, 32, 32, 3)
  for key in ("index", "image", "views"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


@pytest.mark.parametrize("views", [0, 1.5, "2", None])
def test_bad_views(views):
  with pytest.raises(ValueError, match=rf"views={views!r} is not accepted; accepted: an int >= 1"):
    data.load(SYN, "train", views=views)


def test_the_engine_loads_one_view_per_kdcl_net(tmp_path):
  base = cfg.TrainConfig(method="KDCL", arch="resnet8", peers="resnet8,wrn_16_1",
                         dataset=SYN, epochs=1, batch_size=10, train_dir=str(tmp_path / "run"))
  kdcl = distillers.get("KDCL")
  assert engine_run.batch_views(kdcl, cfg.validate(base)) == 3
  assert engine_run.batch_views(distillers.get("CSKD"), cfg.validate(base.replace(
      method="CSKD", peers=""))) == 1
  off = cfg.validate(base.replace(method_args="views=false"))  # the same batch for every net
  assert engine_run.batch_views(kdcl, off) == 1
  job = engine_run._Job(base.replace(peers="resnet8"))  # pylint: disable=protected-access
  assert job.info.views == 2
  assert job.train_ds.element_spec["views"].shape.as_list()[1:] == [2, 32, 32, 3]
  assert "views" not in job.test_ds.element_spec  # evaluation batches are unchanged
