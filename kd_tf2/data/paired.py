"""Class-paired sampling (CS-KD): every streamed sample is followed by a random sample of its class.

Yun, Park, Lee, Shin, "Regularizing Class-wise Predictions via Self-knowledge Distillation",
CVPR 2020, arXiv:2003.13964, sec. 3.1: each training sample x (the anchor) comes with another
sample x' drawn uniformly from the training samples of its class (possibly x itself, as the
authors' sampler allows). The pairs are interleaved, ``[a0, p0, a1, p1, ...]``, before batching:
any split of a batch into equal contiguous parts of even size (the replicas' shares) keeps every
pair together, so the pairing is the same on one device and on several replicas.

An epoch keeps its usual number of batches of ``--batch_size`` images (half anchors, half
partners), i.e. it visits a random half of the anchors; the authors' epoch visits every anchor
with its partner (twice the images per epoch).
"""
import numpy as np
import tensorflow as tf


def class_partners(ds, labels, indices, payload, seed):
  """``ds``: a dataset of ``(index, payload)`` int64 pairs (one epoch, shuffled; payload = where
  the sample's image is: its row of the in-memory images or of the file list); ``labels``: int
  [N], the label of every sample of the split; ``indices`` [M] / ``payload`` [M]: the samples that
  may be drawn (the subset) and their payloads. Returns the dataset of ``(index, payload)`` pairs
  ``anchor, partner, anchor, partner, ...``.
  """
  labels = np.asarray(labels, np.int64)
  indices = np.asarray(indices, np.int64)
  payload_of = np.full(labels.shape, -1, np.int64)
  payload_of[indices] = np.asarray(payload, np.int64)
  by_class = indices[np.argsort(labels[indices], kind="stable")]   # subset grouped by class
  counts = np.bincount(labels[indices], minlength=int(labels.max()) + 1)
  starts = np.cumsum(counts) - counts
  label_of, payload_of = tf.constant(labels), tf.constant(payload_of)
  by_class, counts, starts = (tf.constant(a, tf.int64) for a in (by_class, counts, starts))
  randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)

  def pair(index, where, r):
    c = tf.gather(label_of, index)
    partner = tf.gather(by_class, tf.gather(starts, c) + tf.math.floormod(r, tf.gather(counts, c)))
    return (tf.stack([index, partner]),
            tf.stack([where, tf.gather(payload_of, partner)]))

  return tf.data.Dataset.zip(ds, randoms).map(lambda ix, r: pair(ix[0], ix[1], r)).unbatch()
