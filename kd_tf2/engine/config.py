"""What one training run is: ``TrainConfig`` (the flags of ``train.py``) and its validation.

Defaults reproduce the reference benchmark (RepDistiller, METHODS.md §3): CIFAR-100, ST from a
resnet32x4 teacher to a resnet8x4 student, 240 epochs, batch 64, SGD momentum 0.9, weight decay
5e-4, lr 0.05 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students) x0.1 at 62.5/75/87.5% of the
epochs, the method's own loss weights. ``None`` means "the default of the method / the net /
the protocol".

Two protocols (``--protocol``; ``auto`` picks ``imagenet`` for ImageNet-like dataset names,
``imagenet2012``, ``imagenette``, ..., else ``cifar``) set the defaults of the schedule:

  protocol   epochs  batch  lr                       weight decay  lr x0.1 at epochs
  cifar      240     64     0.05 (0.01 MobileNet/Shuffle)  5e-4    150, 180, 210 (of 240, scaled)
  imagenet   100     256    0.1                      1e-4          30, 60, 90 (of 100, scaled)

(RepDistiller's CIFAR-100 protocol; the ImageNet protocol of CRD / ReviewKD / DKD / mdistiller
``configs/imagenet``). Methods whose references publish ImageNet loss weights take them through
their pair defaults (ST, DKD, ReviewKD: ``kd_tf2.distillers._pairs``) or their protocol (DIST).
"""
import dataclasses
import difflib
import os
import re

import nets
from kd_tf2 import distillers
from kd_tf2.data import AUGMENTS, CACHES
from kd_tf2 import optim
from kd_tf2.checks import is_int, is_number
from kd_tf2.engine.strategy import (DEFAULT_CLUSTER_TIMEOUT, STRATEGIES, check_cluster_timeout,
                                   check_multi_worker_replicas)
from kd_tf2.errors import UsageError

# Flags that change the experiment; the others (where data lives, how it is executed) may change
# between a run and its resumption.
_OPERATIONAL = ("train_dir", "data_dir", "strategy", "cpu_replicas", "jit_compile", "verbose",
                "cluster_timeout", "log_every_n_steps", "checkpoint_every_n_steps",
                "checkpoint_every_minutes", "cache")
# Flags recorded in the settings only when not at their default (data flags, --method_args), so
# that train dirs made before they existed still resume.
_DATA_DEFAULTS = {"image_size": None, "augment": "auto", "method_args": ""}


@dataclasses.dataclass
class TrainConfig:
  """Every setting of a run. See ``train.py --help`` for each one."""
  method: str = "ST"
  arch: str = "resnet8x4"
  teacher_arch: str = None
  teacher_ckpt: str = ""
  teacher_features: str = ""
  student_features: str = ""
  peers: str = ""
  assistants: str = ""
  method_args: str = ""
  dataset: str = "cifar100"
  data_dir: str = ""
  fraction: float = 1.0
  image_size: int = None
  augment: str = "auto"
  cache: str = "auto"
  seed: int = 0
  protocol: str = "auto"
  epochs: int = None
  teacher_epochs: int = None
  init_epochs: int = None
  batch_size: int = None
  lr: float = None
  weight_decay: float = None
  momentum: float = 0.9
  ce_weight: float = None
  kd_weight: float = None
  method_weight: float = None
  temperature: float = None
  train_dir: str = ""
  strategy: str = "auto"
  cpu_replicas: int = 1
  cluster_timeout: float = DEFAULT_CLUSTER_TIMEOUT
  jit_compile: bool = False
  mixed_precision: bool = False
  log_every_n_steps: int = None
  checkpoint_every_n_steps: int = 0
  checkpoint_every_minutes: float = 0.0
  verbose: bool = True

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


def _int(name, value, low):
  if not is_int(value) or value < low:
    raise UsageError(f"--{name}={value!r}: must be an integer >= {low}")


def _number(name, value, low, inclusive=True):
  ok = is_number(value)
  ok = ok and (value >= low if inclusive else value > low)
  if not ok:
    raise UsageError(f"--{name}={value!r}: must be a number {'>=' if inclusive else '>'} {low}")


def validate(config):
  """Check every value that can be checked without data or nets; canonicalise names.

  Returns a new config with the method and net names spelled as their registries spell them.
  Raises ``UsageError`` naming the bad value and the accepted ones.
  """
  c = config
  method = distillers.canonical_name(c.method)
  arch = _net_name("arch", c.arch)
  peers = _peers(c.peers, method)
  assistants = _assistants(c.assistants, method)
  method_args = format_method_args(parse_method_args(c.method_args, method))
  if c.teacher_arch:
    teacher_arch = _net_name("teacher_arch", c.teacher_arch)
  else:  # read from --teacher_ckpt; the default net when the teacher is trained here
    teacher_arch = None if c.teacher_ckpt else DEFAULT_TEACHER
  for flag in ("teacher_features", "student_features"):
    if not isinstance(getattr(c, flag), str):
      raise UsageError(f"--{flag}={getattr(c, flag)!r}: must be comma-separated layer names")
  if not isinstance(c.dataset, str) or not c.dataset.strip():
    raise UsageError(f"--dataset={c.dataset!r}: must name a dataset")
  ok = is_number(c.fraction)
  if not ok or not 0.0 < c.fraction <= 1.0:
    raise UsageError(f"--fraction={c.fraction!r}: must be in (0, 1]")
  if c.image_size is not None:
    _int("image_size", c.image_size, 1)
  augment, cache = _choice("augment", c.augment, AUGMENTS), _choice("cache", c.cache, CACHES)
  _int("seed", c.seed, 0)
  protocol = resolve_protocol(c.protocol, c.dataset)
  schedule = PROTOCOLS[protocol]
  c = c.replace(**{k: schedule[k] for k in ("epochs", "batch_size", "weight_decay")
                   if getattr(c, k) is None})
  _int("epochs", c.epochs, 1)
  teacher_epochs = c.epochs if c.teacher_epochs is None else c.teacher_epochs
  _int("teacher_epochs", teacher_epochs, 1)
  if c.init_epochs is not None:
    _int("init_epochs", c.init_epochs, 0)
  _int("batch_size", c.batch_size, 1)
  _int("cpu_replicas", c.cpu_replicas, 1)
  if c.lr is not None:
    _number("lr", c.lr, 0.0, inclusive=False)
  _number("weight_decay", c.weight_decay, 0.0)
  if not (isinstance(c.momentum, (int, float)) and 0.0 <= c.momentum < 1.0):
    raise UsageError(f"--momentum={c.momentum!r}: must be in [0, 1)")
  for name in ("ce_weight", "kd_weight", "method_weight"):
    if getattr(c, name) is not None:
      _number(name, getattr(c, name), 0.0)
  if c.temperature is not None:
    _number("temperature", c.temperature, 0.0, inclusive=False)
  if c.strategy not in STRATEGIES:
    raise UsageError(f"--strategy={c.strategy!r}: accepted: {', '.join(STRATEGIES)}")
  if c.log_every_n_steps is not None:
    _int("log_every_n_steps", c.log_every_n_steps, 0)
  _int("checkpoint_every_n_steps", c.checkpoint_every_n_steps, 0)
  _number("checkpoint_every_minutes", c.checkpoint_every_minutes, 0.0)
  if c.checkpoint_every_minutes and c.strategy == "multi_worker":
    raise UsageError(f"--checkpoint_every_minutes={c.checkpoint_every_minutes} with "
                     "--strategy=multi_worker: the workers' clocks would save at different steps; "
                     "use --checkpoint_every_n_steps")
  check_cluster_timeout(c.cluster_timeout)
  if c.strategy == "multi_worker":
    check_multi_worker_replicas(c.cpu_replicas)
  cls = distillers.get(method)
  if c.init_epochs is not None and cls.init_epochs is None:
    raise UsageError(f"--init_epochs={c.init_epochs}: method {method} has no init stage "
                     f"(methods with one: {', '.join(distillers.with_stages())})")
  if c.teacher_ckpt and not needs_teacher(c.replace(method=method, peers=peers)):
    raise UsageError(f"--teacher_ckpt={c.teacher_ckpt}: method {method} reads no teacher (it "
                     "would be ignored); drop the flag, or set --kd_weight > 0 to distil with it")
  if c.teacher_ckpt and not cls.pretrained_teacher:
    raise UsageError(f"--teacher_ckpt={c.teacher_ckpt}: method {method} trains its "
                     f"{teacher_arch or 'teacher'} peer from scratch together with the student; "
                     "drop the flag")
  c = c.replace(peers=peers, assistants=assistants, method_args=method_args)
  return c.replace(method=method, arch=arch, teacher_arch=teacher_arch,
                   teacher_epochs=teacher_epochs, protocol=protocol, augment=augment,
                   cache=cache,
                   dataset=c.dataset.strip(),
                   teacher_ckpt=os.path.abspath(c.teacher_ckpt) if c.teacher_ckpt else "",
                   train_dir=c.train_dir or default_train_dir(c, method, arch, teacher_arch))


def _choice(flag, value, accepted):
  if not isinstance(value, str) or value.lower() not in accepted:
    raise UsageError(f"--{flag}={value!r}: accepted: {', '.join(accepted)}")
  return value.lower()


DEFAULT_TEACHER = "resnet32x4"


def is_model_file(name):
  """Whether a net name is a Keras model file (``PATH.keras``) rather than a zoo name."""
  return isinstance(name, str) and name.strip().lower().endswith(".keras")


def _assistants(value, method):
  """``--assistants``: comma list of nets between teacher and student (TAKD chains)."""
  if not isinstance(value, str):
    raise UsageError(f"--assistants={value!r}: must be a comma-separated list of nets")
  names = [_net_name("assistants", n) for n in value.split(",") if n.strip()]
  cls = distillers.get(method)
  if names and not (cls.pretrained_teacher and cls.reads_teacher()):
    raise UsageError(f"--assistants={value}: method {method} does not distil from a trained "
                     "teacher; chains need an offline method (e.g. ST, AT, DKD)")
  return ",".join(names)


# Constructor keywords with a flag of their own, or filled by the engine: not in --method_args.
_FLAGGED_HPARAMS = ("ce_weight", "kd_weight", "method_weight", "temperature", "init_epochs",
                    "peers")


def method_arg_names(method):
  """The constructor keywords of ``method`` that ``--method_args`` may set (those without a flag
  of their own and not filled by the engine), sorted."""
  cls = distillers.get(method)
  reserved = set(_FLAGGED_HPARAMS) | set(cls.engine_hparams)
  return [n for n in cls.accepted_hparams() if n not in reserved]


def _arg_value(text):
  """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"``/``"false"`` -> bool, ``"none"`` -> None, else
  the text itself."""
  lowered = text.lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered == "none":
    return None
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def parse_method_args(value, method):
  """``--method_args="branches=4,alpha=0.5"`` -> ``{"alpha": 0.5, "branches": 4}``: the method's
  own constructor keywords (``method_arg_names``); values are ints, floats, true/false, none or
  text. The method's constructor checks the values."""
  if not isinstance(value, str):
    raise UsageError(f"--method_args={value!r}: must be KEY=VALUE[,KEY=VALUE...]")
  out = {}
  accepted = method_arg_names(method)
  for item in (i.strip() for i in value.split(",")):
    if not item:
      continue
    key, sep, text = (part.strip() for part in item.partition("="))
    if not sep or not key or not text:
      raise UsageError(f"--method_args={value!r}: {item!r} is not KEY=VALUE")
    if key in _FLAGGED_HPARAMS:
      raise UsageError(f"--method_args: set {key} with --{key}, not in --method_args")
    if key not in accepted:
      takes = f"accepted: {', '.join(accepted)}" if accepted else "it takes none"
      raise UsageError(f"--method_args: method {method} has no argument {key!r}; {takes}"
                       f"{did_you_mean(key, accepted)}")
    if key in out:
      raise UsageError(f"--method_args={value!r}: {key} given twice")
    out[key] = _arg_value(text)
  return dict(sorted(out.items()))


def format_method_args(args):
  """The canonical ``--method_args`` text of a parsed dict (sorted keys; recorded in settings)."""
  def text(v):
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
  return ",".join(f"{k}={text(v)}" for k, v in sorted(args.items()))


def method_kwargs(config):
  """The constructor keywords ``--method_args`` gives the run's method."""
  return parse_method_args(config.method_args, config.method)


def _peers(value, method):
  """``--peers``: comma list of zoo nets -> canonical comma list; refused for methods without
  peers, required by methods that need some (``min_peers``)."""
  if not isinstance(value, str):
    raise UsageError(f"--peers={value!r}: must be a comma-separated list of nets")
  names = [_net_name("peers", n) for n in value.split(",") if n.strip()] if value.strip() else []
  cls = distillers.get(method)
  takes = "peers" in cls.accepted_hparams()
  if names and not takes:
    with_peers = [m for m in distillers.available()
                  if "peers" in distillers.get(m).accepted_hparams()]
    raise UsageError(f"--peers={value}: method {method} trains no peers (methods with peers: "
                     f"{', '.join(with_peers)})")
  need = getattr(cls, "min_peers", 0)
  if len(names) < need:
    raise UsageError(f"--peers={value!r}: method {method} needs at least {need} peer net(s), "
                     "e.g. --peers=resnet20")
  return ",".join(names)


def _net_name(flag, name):
  """The zoo spelling of ``name``, or the absolute path of a ``.keras`` model file."""
  if is_model_file(name):
    path = os.path.abspath(os.path.expanduser(name.strip()))
    if not os.path.isfile(path):
      raise UsageError(f"--{flag}={name}: no such model file")
    return path
  try:
    return nets.canonical_name(name)
  except ValueError as e:
    raise UsageError(f"--{flag}: {e}{did_you_mean(name, nets.available())}") from None


def did_you_mean(name, known):
  """``" - did you mean X?"`` for the closest known names (case-insensitive), else ``""``."""
  if not isinstance(name, str):
    return ""
  lowered = {k.lower(): k for k in known}
  close = difflib.get_close_matches(name.strip().lower(), list(lowered), n=2, cutoff=0.6)
  return f" - did you mean {' or '.join(lowered[k] for k in close)}?" if close else ""


def net_label(name):
  """A short label of a net name or model file (its base name without extension), for messages."""
  if name and (is_model_file(name) or os.sep in name):
    name = os.path.splitext(os.path.basename(name.rstrip(os.sep)))[0]
  return name


def default_train_dir(c, method, arch, teacher_arch):
  """``runs/<dataset>/<method>_<teacher>_<student>_seed<seed>`` (no teacher part for ``none``)."""
  data = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(c.dataset.rstrip("/\\")) or "data")
  teacher = net_label(teacher_arch) or net_label(c.teacher_ckpt) or "teacher"
  pair = net_label(arch) if method == "none" else f"{teacher}_{net_label(arch)}"
  if not needs_teacher(c.replace(method=method)):
    pair = "_".join([net_label(arch)] + [p for p in c.peers.split(",") if p])
  return os.path.join("runs", data, f"{method}_{pair}_seed{c.seed}")


def needs_teacher(config):
  """Whether the run reads a teacher (the method uses one, or ``--kd_weight`` turns KD on)."""
  cls = distillers.get(config.method)
  if config.peers and not cls.pretrained_teacher:
    return False  # the --peers replace the teacher slot's peer (DML cohorts)
  return cls.reads_teacher(config.kd_weight)


def teacher_source(config):
  """Where the run's teacher comes from: None (no teacher), ``"checkpoint"`` (--teacher_ckpt),
  ``"train"`` (trained first into TRAIN_DIR/teacher) or ``"fresh"`` (a new net trained together
  with the student: methods with ``pretrained_teacher = False``, e.g. DML's peer)."""
  if not needs_teacher(config):
    return None
  if not distillers.get(config.method).pretrained_teacher:
    return "fresh"
  return "checkpoint" if config.teacher_ckpt else "train"


PROTOCOLS = {
    "cifar": dict(epochs=240, batch_size=64, weight_decay=5e-4, lr=None,
                  milestones=(150, 180, 210), reference_epochs=240),
    "imagenet": dict(epochs=100, batch_size=256, weight_decay=1e-4, lr=0.1,
                     milestones=(30, 60, 90), reference_epochs=100),
}


def resolve_protocol(protocol, dataset):
  """``cifar`` or ``imagenet``: ``protocol`` itself, or for ``auto`` the dataset's
  (``kd_tf2.distillers._pairs.dataset_protocol``)."""
  from kd_tf2.distillers._pairs import dataset_protocol  # pylint: disable=import-outside-toplevel
  accepted = ("auto",) + tuple(PROTOCOLS)
  if not isinstance(protocol, str) or protocol.lower() not in accepted:
    raise UsageError(f"--protocol={protocol!r}: accepted: {', '.join(accepted)}")
  protocol = protocol.lower()
  return dataset_protocol(dataset) if protocol == "auto" else protocol


def schedule(config):
  """``(milestones, reference_epochs)`` of the validated ``config``'s protocol: the learning rate
  drops x0.1 at those epochs of a ``reference_epochs``-epoch run, scaled to ``--epochs``."""
  p = PROTOCOLS[resolve_protocol(config.protocol, config.dataset)]
  return p["milestones"], p["reference_epochs"]


def log_every_n_steps(config, steps_per_epoch):
  """``--log_every_n_steps``, or by default 1/20 of an epoch for epochs of 500 steps and more
  (ImageNet at batch 256: every 250 steps), else 0 (one log line per epoch)."""
  if config.log_every_n_steps is not None:
    return config.log_every_n_steps
  return steps_per_epoch // 20 if steps_per_epoch >= 500 else 0


def base_lr(config):
  """``--lr``, else the protocol's (ImageNet 0.1), else the CIFAR benchmark's default for the
  student (``optim.default_lr``)."""
  if config.lr is not None:
    return config.lr
  protocol = resolve_protocol(config.protocol, config.dataset)
  return PROTOCOLS[protocol]["lr"] or optim.default_lr(config.arch)


def settings(config):
  """The experiment-defining values, resolved (method defaults filled in): what a rerun in the
  same train dir must repeat exactly to be allowed to resume."""
  cls = distillers.get(config.method)
  out = {k: v for k, v in dataclasses.asdict(config).items() if k not in _OPERATIONAL}
  for name, default in _DATA_DEFAULTS.items():
    if out[name] == default:
      del out[name]
  for name in ("ce_weight", "kd_weight", "method_weight", "temperature", "init_epochs"):
    if out[name] is None:
      out[name] = getattr(cls, name)
  out["lr"] = base_lr(config)
  if out["protocol"] == "cifar":  # recorded only when not the original benchmark's, so that
    del out["protocol"]           # train dirs made before --protocol existed still resume
  source = teacher_source(config)
  if source is None:
    out.update(teacher_arch=None, teacher_ckpt=None, teacher_epochs=None, teacher_features="")
  elif source != "train":
    out["teacher_epochs"] = None
  return out


# What a teacher run does not take from the flags of the run it teaches: it is plain cross-entropy
# training of ``teacher_arch`` for ``teacher_epochs`` at the teacher's own default learning rate.
# The one list (``train.py``'s teacher and ``kd_tf2.bench table``'s teacher row both use it).
TEACHER_RESETS = ("teacher_ckpt", "peers", "assistants", "method_args", "teacher_epochs",
                  "init_epochs", "lr", "ce_weight", "kd_weight", "method_weight", "temperature")


def teacher_config(config, train_dir=None):
  """The config of the teacher trained for ``config``'s run: into ``train_dir`` (default
  ``TRAIN_DIR/teacher``, where ``train.py`` trains it when no checkpoint is given)."""
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
  epochs = config.epochs if config.teacher_epochs is None else config.teacher_epochs
  return config.replace(**{k: defaults[k] for k in TEACHER_RESETS}, method="none",
                        arch=config.teacher_arch, epochs=epochs,
                        student_features=config.teacher_features, teacher_features="",
                        train_dir=train_dir or os.path.join(config.train_dir, "teacher"))
