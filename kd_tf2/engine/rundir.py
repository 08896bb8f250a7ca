"""The train directory: one experiment's flags, checkpoints, metrics, results and exports.

    TRAIN_DIR/flags.json        {"flags": as given, "settings": resolved}; a rerun must match
    TRAIN_DIR/checkpoints/      tf.train.CheckpointManager (student, distiller, optimisers, progress)
    TRAIN_DIR/events.out...     TensorBoard
    TRAIN_DIR/metrics.jsonl     one JSON line per epoch
    TRAIN_DIR/student.keras     the exported student (Keras format, for test.py and fine-tuning)
    TRAIN_DIR/saved_model/      the exported student (SavedModel, for serving)
    TRAIN_DIR/results.json      written last: a finished run
    TRAIN_DIR/teacher/          the teacher's own train dir when train.py trained it
"""
import json
import os

from kd_tf2.errors import UsageError

FLAGS_FILE = "flags.json"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
KERAS_FILE = "student.keras"
SAVED_MODEL = "saved_model"

NEW, RESUME, DONE = "new", "resume", "done"


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

  def state(self, settings):
    """``NEW``, ``RESUME`` or ``DONE``; ``UsageError`` if the dir belongs to another experiment,
    is not a train dir, or cannot be written. Writes nothing."""
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
    try:
      with open(flags_path) as f:
        stored = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
      raise UsageError(f"{flags_path} is unreadable or corrupt; choose another --train_dir") from None
    diff = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
    if diff:
      detail = ", ".join(f"--{k}={stored.get(k)!r} there vs {settings.get(k)!r} now" for k in diff)
      raise UsageError(f"--train_dir={self.path} was made with different flags ({detail}); rerun "
                       "with the same flags to resume, or choose another --train_dir")
    if not os.access(self.path, os.W_OK):
      raise UsageError(f"--train_dir={self.path} is not writable")
    return DONE if os.path.exists(self.join(RESULTS_FILE)) else RESUME

  def create(self, flags, settings):
    """Make the dir and record the flags (first run only)."""
    os.makedirs(self.path, exist_ok=True)
    if not os.path.exists(self.join(FLAGS_FILE)):
      _write_json(self.join(FLAGS_FILE), {"flags": flags, "settings": settings})

  def append_metrics(self, record):
    with open(self.join(METRICS_FILE), "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")

  def write_results(self, results):
    _write_json(self.join(RESULTS_FILE), results)

  def results(self):
    with open(self.join(RESULTS_FILE)) as f:
      return json.load(f)


def _check_creatable(path):
  """The nearest existing ancestor of ``path`` must be a writable directory."""
  parent = os.path.dirname(path)
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  parent = parent or "."
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
    raise UsageError(f"--train_dir={path} cannot be created: {parent} is not a writable directory")
