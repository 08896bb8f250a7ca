"""Per-(student, teacher) and per-protocol defaults taken from a reference's configs.

A method lists the values its reference tunes per pair in a class attribute

    pair_defaults = {("wrn_16_2", "wrn_40_2"): {"beta": 6.0}, ...}      # (student, teacher) archs

with the config file each value comes from in ``pair_sources``. ``apply_pair_defaults`` sets, for
the running pair, every listed attribute the user did not pass explicitly (``None`` = not passed)
and returns what it applied; the distiller reports it in ``hparams()`` (``pair_defaults``), which
the engine logs at the start of a run. An explicit flag always wins.

A *protocol* is the benchmark a run belongs to: "cifar" (32x32 CIFAR-like data: every dataset of
kd_tf2.data today) or "imagenet". Methods whose reference tunes hyper-parameters per protocol (DIST)
take a ``protocol`` constructor keyword; the engine fills it from the dataset name
(``dataset_protocol``) and explicit flags still win.
"""

__all__ = ["PROTOCOLS", "apply_pair_defaults", "dataset_protocol", "describe"]

PROTOCOLS = ("cifar", "imagenet")


def dataset_protocol(dataset):
  """"imagenet" for an ImageNet-like dataset name (``imagenet*``), else "cifar"."""
  name = str(dataset or "").lower()
  return "imagenet" if name.startswith("imagenet") else "cifar"


def apply_pair_defaults(distiller, explicit):
  """Set ``distiller``'s per-pair reference defaults; return {attribute: value} applied.

  explicit: {attribute: value or None} as passed to the constructor (None = use the default).
  Attributes listed for the pair but passed explicitly keep the explicit value.
  """
  table = getattr(type(distiller), "pair_defaults", {})
  pair = (getattr(distiller.student, "arch", None), getattr(distiller.teacher, "arch", None))
  applied = {}
  for attr, value in table.get(pair, {}).items():
    if explicit.get(attr) is None:
      setattr(distiller, attr, float(value))
      applied[attr] = float(value)
  return applied


def describe(distiller, applied):
  """``hparams()`` entry: "beta=6 (mdistiller configs/...)" or None when nothing was applied."""
  if not applied:
    return None
  pair = (getattr(distiller.student, "arch", None), getattr(distiller.teacher, "arch", None))
  source = getattr(type(distiller), "pair_sources", {}).get(pair, "the reference's config")
  values = ", ".join(f"{k}={v:g}" for k, v in sorted(applied.items()))
  return f"{values} ({source})"
