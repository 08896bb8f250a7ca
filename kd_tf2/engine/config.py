"""What one training run is: ``TrainConfig`` (the flags of ``train.py``) and its validation.

Defaults reproduce the reference benchmark (RepDistiller, METHODS.md §3): CIFAR-100, ST from a
resnet32x4 teacher to a resnet8x4 student, 240 epochs, batch 64, SGD momentum 0.9, weight decay
5e-4, lr 0.05 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students) x0.1 at 62.5/75/87.5% of the
epochs, the method's own loss weights. ``None`` means "the default of the method / the net".
"""
import dataclasses
import os
import re

import nets
from kd_tf2 import distillers
from kd_tf2 import optim
from kd_tf2.checks import is_int, is_number
from kd_tf2.engine.strategy import (DEFAULT_CLUSTER_TIMEOUT, STRATEGIES, check_cluster_timeout,
                                   check_multi_worker_replicas)
from kd_tf2.errors import UsageError

# Flags that change the experiment; the others (where data lives, how it is executed) may change
# between a run and its resumption.
_OPERATIONAL = ("train_dir", "data_dir", "strategy", "cpu_replicas", "jit_compile", "verbose",
                "cluster_timeout", "log_every_n_steps", "checkpoint_every_n_steps",
                "checkpoint_every_minutes")


@dataclasses.dataclass
class TrainConfig:
  """Every setting of a run. See ``train.py --help`` for each one."""
  method: str = "ST"
  arch: str = "resnet8x4"
  teacher_arch: str = "resnet32x4"
  teacher_ckpt: str = ""
  peers: str = ""
  assistants: str = ""
  dataset: str = "cifar100"
  data_dir: str = ""
  fraction: float = 1.0
  seed: int = 0
  epochs: int = 240
  teacher_epochs: int = None
  init_epochs: int = None
  batch_size: int = 64
  lr: float = None
  weight_decay: float = 5e-4
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
  teacher_arch = _net_name("teacher_arch", c.teacher_arch)
  if not isinstance(c.dataset, str) or not c.dataset.strip():
    raise UsageError(f"--dataset={c.dataset!r}: must name a dataset")
  ok = is_number(c.fraction)
  if not ok or not 0.0 < c.fraction <= 1.0:
    raise UsageError(f"--fraction={c.fraction!r}: must be in (0, 1]")
  _int("seed", c.seed, 0)
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
                     f"{teacher_arch} peer from scratch together with the student; drop the flag")
  c = c.replace(peers=peers, assistants=assistants)
  return c.replace(method=method, arch=arch, teacher_arch=teacher_arch,
                   teacher_epochs=teacher_epochs,
                   dataset=c.dataset.strip(),
                   teacher_ckpt=os.path.abspath(c.teacher_ckpt) if c.teacher_ckpt else "",
                   train_dir=c.train_dir or default_train_dir(c, method, arch, teacher_arch))


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
  try:
    return nets.canonical_name(name)
  except ValueError as e:
    raise UsageError(f"--{flag}: {e}") from None


def default_train_dir(c, method, arch, teacher_arch):
  """``runs/<dataset>/<method>_<teacher>_<student>_seed<seed>`` (no teacher part for ``none``)."""
  data = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(c.dataset.rstrip("/\\")) or "data")
  pair = arch if method == "none" else f"{teacher_arch}_{arch}"
  if not needs_teacher(c.replace(method=method)):
    pair = "_".join([arch] + [p for p in c.peers.split(",") if p])
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


def log_every_n_steps(config, steps_per_epoch):
  """``--log_every_n_steps``, or by default 1/20 of an epoch for epochs of 500 steps and more
  (ImageNet at batch 256: every 250 steps), else 0 (one log line per epoch)."""
  if config.log_every_n_steps is not None:
    return config.log_every_n_steps
  return steps_per_epoch // 20 if steps_per_epoch >= 500 else 0


def base_lr(config):
  """``--lr`` or the benchmark's default for the student (``optim.default_lr``)."""
  return config.lr if config.lr is not None else optim.default_lr(config.arch)


def settings(config):
  """The experiment-defining values, resolved (method defaults filled in): what a rerun in the
  same train dir must repeat exactly to be allowed to resume."""
  cls = distillers.get(config.method)
  out = {k: v for k, v in dataclasses.asdict(config).items() if k not in _OPERATIONAL}
  for name in ("ce_weight", "kd_weight", "method_weight", "temperature", "init_epochs"):
    if out[name] is None:
      out[name] = getattr(cls, name)
  out["lr"] = base_lr(config)
  source = teacher_source(config)
  if source is None:
    out.update(teacher_arch=None, teacher_ckpt=None, teacher_epochs=None)
  elif source != "train":
    out["teacher_epochs"] = None
  return out


# What a teacher run does not take from the flags of the run it teaches: it is plain cross-entropy
# training of ``teacher_arch`` for ``teacher_epochs`` at the teacher's own default learning rate.
# The one list (``train.py``'s teacher and ``kd_tf2.bench table``'s teacher row both use it).
TEACHER_RESETS = ("teacher_ckpt", "peers", "assistants", "teacher_epochs", "init_epochs", "lr",
                  "ce_weight", "kd_weight", "method_weight", "temperature")


def teacher_config(config, train_dir=None):
  """The config of the teacher trained for ``config``'s run: into ``train_dir`` (default
  ``TRAIN_DIR/teacher``, where ``train.py`` trains it when no checkpoint is given)."""
  defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
  epochs = config.epochs if config.teacher_epochs is None else config.teacher_epochs
  return config.replace(**{k: defaults[k] for k in TEACHER_RESETS}, method="none",
                        arch=config.teacher_arch, epochs=epochs,
                        train_dir=train_dir or os.path.join(config.train_dir, "teacher"))
