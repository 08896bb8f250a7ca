"""The train directory: one experiment's flags, checkpoints, metrics, results and exports.

    TRAIN_DIR/flags.json        {"flags": as given, "settings": resolved, "subset": the training
                                images (count, fingerprint)}; a rerun must match
    TRAIN_DIR/checkpoints/      tf.train.CheckpointManager (student, distiller, optimisers, progress)
    TRAIN_DIR/events.out...     TensorBoard
    TRAIN_DIR/metrics.jsonl     one JSON line per epoch
    TRAIN_DIR/student.keras     the exported student (Keras format, for test.py and fine-tuning)
    TRAIN_DIR/saved_model/      the exported student (SavedModel, for serving)
    TRAIN_DIR/results.json      written last: a finished run
    TRAIN_DIR/teacher/          the teacher's own train dir when train.py trained it

A process killed at any moment (SIGKILL, power loss) leaves a dir a rerun resumes from: JSON files
are replaced atomically, TF writes a checkpoint before it lists it, and a checkpoint that was listed
but is damaged anyway (a truncated or garbled file) is skipped for the previous complete one.
"""
import json
import os
import re

from kd_tf2.errors import UsageError

FLAGS_FILE = "flags.json"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
KERAS_FILE = "student.keras"
SAVED_MODEL = "saved_model"

NEW, RESUME, DONE = "new", "resume", "done"
_CHECKPOINT_INDEX = re.compile(r"^(ckpt-(\d+))\.index$")  # CheckpointManager's default naming


def _write_json(path, obj):
  """Atomic write (a killed process never leaves a half-written file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class RunDir:
  """Paths and bookkeeping of one train dir."""

  def __init__(self, path):
    self.path = os.path.abspath(os.path.expanduser(path))

  def join(self, *parts):
    return os.path.join(self.path, *parts)

  @property
  def checkpoints(self):
    return self.join(CHECKPOINTS)

  @property
  def keras_file(self):
    return self.join(KERAS_FILE)

  @property
  def saved_model(self):
    return self.join(SAVED_MODEL)

  def settings(self):
    """The experiment settings recorded by ``create`` (a dict), or None when the dir holds no
    flags file; ``UsageError`` if that file is unreadable."""
    record = self._record()
    return None if record is None else record["settings"]

  def _record(self):
    flags_path = self.join(FLAGS_FILE)
    if not os.path.exists(flags_path):
      return None
    try:
      with open(flags_path) as f:
        record = json.load(f)
      record["settings"]  # pylint: disable=pointless-statement
      return record
    except (OSError, ValueError, KeyError, TypeError):
      raise UsageError(f"{flags_path} is unreadable or corrupt; choose another --train_dir") from None

  def settings_diff(self, settings):
    """``[(name, recorded value, value of settings), ...]`` where the recorded settings and
    ``settings`` differ (JSON-normalised: tuples compare as lists)."""
    return _diff(self.settings() or {}, settings)

  def state(self, settings, subset=None):
    """``NEW``, ``RESUME`` or ``DONE``; ``UsageError`` if the dir belongs to another experiment
    (other settings, or another training ``subset`` - a dict as ``create`` records it), is not a
    train dir, cannot be written, or holds checkpoints none of which can be read. Writes nothing.
    For ``RESUME``, ``self.newest`` is then ``(prefix, damaged)`` of ``usable_checkpoint``: the
    checkpoint the run resumes from (the one place that chooses it)."""
    self.newest = (None, [])
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise UsageError(f"--train_dir={self.path} exists and is not a directory")
    flags_path = self.join(FLAGS_FILE)
    if not os.path.isdir(self.path):
      _check_creatable(self.path)
      return NEW
    if not os.path.exists(flags_path):
      if os.listdir(self.path):
        raise UsageError(f"--train_dir={self.path} is not empty and is not a kd_tf2 train dir "
                         f"(no {FLAGS_FILE}); choose another --train_dir")
      _check_creatable(self.path)
      return NEW
    record = self._record()
    diff = _diff(record["settings"], settings)
    if diff:
      detail = ", ".join(f"--{k}={there!r} there vs {now!r} now" for k, there, now in diff)
      raise UsageError(f"--train_dir={self.path} was made with different flags ({detail}); rerun "
                       "with the same flags to resume, or choose another --train_dir")
    recorded = record.get("subset")
    if subset is not None and recorded is not None and recorded != subset:
      raise UsageError(
          f"--train_dir={self.path} was trained on another subset of the training split "
          f"({_describe(recorded)}) than --dataset/--fraction/--seed select now "
          f"({_describe(subset)}): the dataset changed since; restore it or choose another "
          "--train_dir")
    if not os.access(self.path, os.W_OK):
      raise UsageError(f"--train_dir={self.path} is not writable")
    if os.path.exists(self.join(RESULTS_FILE)):
      return DONE
    usable, damaged = self.newest = usable_checkpoint(self.checkpoints)
    if damaged and usable is None:
      why = "; ".join(f"{name}: {reason}" for name, reason in damaged)
      raise UsageError(f"--train_dir={self.path}: no checkpoint in {self.checkpoints} can be read "
                       f"({why}); move that directory away to restart the run from epoch 0")
    return RESUME

  def create(self, flags, settings, subset=None):
    """Make the dir and record the flags and the training subset (first run only)."""
    os.makedirs(self.path, exist_ok=True)
    if not os.path.exists(self.join(FLAGS_FILE)):
      record = {"flags": flags, "settings": settings}
      if subset is not None:
        record["subset"] = subset
      _write_json(self.join(FLAGS_FILE), record)

  def append_metrics(self, record):
    with open(self.join(METRICS_FILE), "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")

  def trim_metrics(self, epochs_done):
    """Keep the metrics of the first ``epochs_done`` epochs only (what the resumed checkpoint
    holds): an epoch logged after its checkpoint was lost, or a half-written line, is dropped
    before it is trained and logged again."""
    path = self.join(METRICS_FILE)
    if not os.path.exists(path):
      return
    kept = []
    with open(path) as f:
      for line in f:
        try:
          epoch = json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
          continue
        if isinstance(epoch, int) and epoch <= epochs_done:
          kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)

  def write_results(self, results):
    _write_json(self.join(RESULTS_FILE), results)

  def results(self):
    """The results dict of a finished run (``results.json``); ``OSError``/``ValueError`` if the
    run has none or it is unreadable."""
    with open(self.join(RESULTS_FILE)) as f:
      return json.load(f)


def _diff(stored, settings):
  wanted = json.loads(json.dumps(settings))
  return [(k, stored.get(k), wanted.get(k)) for k in sorted(set(stored) | set(wanted))
          if stored.get(k) != wanted.get(k)]


def _describe(subset):
  return f"{subset.get('images')} images, fingerprint {subset.get('fingerprint')}"


def checkpoint_prefixes(directory):
  """Every checkpoint of ``directory`` that has an index file, newest (highest number) first.

  Found by listing the files, not from TF's ``checkpoint`` state file, which a crash may leave
  damaged (TF then ignores it and would silently restart from epoch 0)."""
  if not directory or not os.path.isdir(directory):
    return []
  numbered = [(int(m.group(2)), os.path.join(directory, m.group(1)))
              for m in map(_CHECKPOINT_INDEX.match, os.listdir(directory)) if m]
  return [prefix for _, prefix in sorted(numbered, reverse=True)]


def checkpoint_damage(prefix):
  """None if every tensor of checkpoint ``prefix`` reads back (TF checks each one's checksum),
  else the reason, in one line."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    reader = tf.train.load_checkpoint(prefix)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except Exception as e:  # pylint: disable=broad-except  (the C++ reader raises OpError,
    # IndexError, ValueError... for truncated or garbled files: any of them means "damaged")
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
  return None


def usable_checkpoint(directory):
  """(the newest readable checkpoint prefix of ``directory`` or None, [(name, reason)] of the
  damaged newer ones skipped to reach it)."""
  damaged = []
  for prefix in checkpoint_prefixes(directory):
    reason = checkpoint_damage(prefix)
    if reason is None:
      return prefix, damaged
    damaged.append((os.path.basename(prefix), reason))
  return None, damaged


def _check_creatable(path):
  """The nearest existing ancestor of ``path`` must be a writable directory."""
  parent = os.path.dirname(path)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  parent = parent or "."
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise UsageError(f"--train_dir={path} cannot be created: {parent} is not a writable directory")
