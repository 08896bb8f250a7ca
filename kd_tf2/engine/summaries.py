"""What a run tells the user: TensorBoard event files and the console.

TensorBoard (one run directory per experiment, ``tensorboard --logdir runs``): a scalar per loss
term (``<phase>/train/<term>``), ``<phase>/train/loss`` and ``top1``, ``test/top1|top5|loss``,
``<phase>/lr``, ``<phase>/images_per_sec``, ``<phase>/epoch_time_s``, all against the epoch; with
``--log_every_n_steps``, ``<phase>/step/<term>`` and ``<phase>/step/images_per_sec`` against the
global step (epoch x steps per epoch + step); the flags as a text table and as hparams (HParams
dashboard). ``<phase>`` is ``main`` or ``stage_<name>``. The console gets a progress bar per epoch
(with the epoch's ETA), one line per epoch and one per logged step window (with the run's ETA).
"""
import sys

import tensorflow as tf

try:  # tensorboard is a separate package since TF 2.21
  from tensorboard.plugins.hparams import api as hparams_api
except ImportError:  # pragma: no cover - requirements.txt lists tensorboard
  hparams_api = None

try:
  import tqdm as _tqdm
except ImportError:  # pragma: no cover - requirements.txt lists tqdm
  _tqdm = None


class Summaries:
  """TensorBoard writer of one run (a no-op when ``logdir`` is None, e.g. non-chief workers)."""

  def __init__(self, logdir):
    self.writer = tf.summary.create_file_writer(logdir) if logdir else None

  def scalars(self, step, values):
    """Write ``{tag: float}`` at integer ``step`` (the epoch, or the global step)."""
    if self.writer is None:
      return
    with self.writer.as_default(step=int(step)):
      for tag, value in values.items():
        tf.summary.scalar(tag, float(value))
    self.writer.flush()

  def flags(self, flags, hparams):
    """The command line as a markdown table, and the run's hyper-parameters (HParams plugin)."""
    if self.writer is None:
      return
    rows = ["| flag | value |", "|---|---|"]
    rows += [f"| {k} | {v} |" for k, v in sorted(flags.items())]
    with self.writer.as_default(step=0):
      tf.summary.text("flags", "\n".join(rows))
      if hparams_api is not None:
        hparams_api.hparams({k: _hparam_value(v) for k, v in hparams.items()})
    self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _hparam_value(v):
  if isinstance(v, (bool, int, float, str)):
    return v
  return str(v)


class Progress:
  """A console progress bar over the steps of one epoch (tqdm on stderr when it is a terminal;
  logs and pipes get only the per-epoch lines)."""

  def __init__(self, total, desc, enabled=True):
    self.bar = None
    if enabled and _tqdm is not None and sys.stderr.isatty():
      self.bar = _tqdm.tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                            dynamic_ncols=True, mininterval=0.5, unit="step")

  def update(self, values):
    if self.bar is not None:
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
      self.bar.update(1)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def say(message, enabled=True):
  """One line to stdout (flushed), for humans."""
  if enabled:
    print(message, flush=True)
