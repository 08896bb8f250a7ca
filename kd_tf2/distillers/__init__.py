"""Distillation methods: a registry of ``Distiller`` subclasses (DESIGN.md contract 3).

    d = kd_tf2.distillers.create("AT", student, teacher, method_weight=1000.0)
    kd_tf2.distillers.available()      # canonical names, e.g. ["AT", "FitNet", "ST", "none", ...]

Names are matched case-insensitively; aliases resolve to their method (``KD`` = ``Soft_logits`` =
``ST``). An unknown name raises ``UsageError`` listing the known ones.

How to add a method
-------------------
1. Create ``kd_tf2/distillers/<method>.py`` (one module per method; the package imports every
   module in this directory, so no other file changes).
2. Subclass ``Distiller`` (``kd_tf2/distillers/base.py`` documents every hook), set the METHODS.md §3
   defaults as class attributes (``ce_weight``, ``kd_weight``, ``method_weight``, ``init_epochs``),
   create connectors in ``build_connectors`` and return the weighted terms from ``terms``.
   Method-specific hyper-parameters are keyword-only constructor arguments with their defaults.
3. The registration line: decorate the class with ``@register("NAME", "ALIAS", ...)``.
4. Test it in ``tests/``: finite loss on a tiny pair, gradients reach the student and every
   connector and never the teacher.
"""
import difflib
import importlib
import pkgutil

from kd_tf2.distillers.base import Distiller, Stage, StepContext, StepOutput
from kd_tf2.errors import UsageError

__all__ = ["Distiller", "Stage", "StepContext", "StepOutput", "register", "create", "available",
           "get", "canonical_name", "with_stages", "engine_kwargs"]

_CLASSES = {}    # lower-case name or alias -> class
_CANONICAL = {}  # lower-case name or alias -> canonical name
_NOT_METHODS = {"base"}
_discovered = False


def register(name, *aliases):
  """Class decorator: register a ``Distiller`` subclass under ``name`` and ``aliases``."""

  def decorate(cls):
    if not (isinstance(cls, type) and issubclass(cls, Distiller)):
      raise TypeError(f"@register({name!r}) expects a Distiller subclass, got {cls!r}")
    for key in (name,) + aliases:
      low = key.lower()
      if low in _CLASSES and _CLASSES[low] is not cls:
        raise ValueError(f"method name {key!r} is already registered by {_CLASSES[low].__name__}")
      _CLASSES[low] = cls
      _CANONICAL[low] = name
    cls.method_name = name
    cls.aliases = tuple(aliases)
    return cls

  return decorate


def _discover():
  """Import every method module of this package once (their ``@register`` lines run)."""
  global _discovered
  if _discovered:
    return
  _discovered = True
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if info.name.startswith("_") or info.name in _NOT_METHODS:
      continue
    importlib.import_module(f"{__name__}.{info.name}")


def available():
  """Canonical method names, sorted case-insensitively."""
  _discover()
  return sorted(set(_CANONICAL.values()), key=str.lower)


def _accepted():
  names = []
  for canon in available():
    aliases = _CLASSES[canon.lower()].aliases
    names.append(f"{canon} ({'/'.join(aliases)})" if aliases else canon)
  return ", ".join(names)


def get(method):
  """The ``Distiller`` class registered under ``method`` (any case, aliases allowed)."""
  _discover()
  if not isinstance(method, str) or method.lower() not in _CLASSES:
    close = difflib.get_close_matches(str(method).lower(), list(_CLASSES), n=1, cutoff=0.6)
    hint = f" - did you mean {_CANONICAL[close[0]]}?" if close else ""
    raise UsageError(f"unknown method {method!r}; available: {_accepted()}{hint}")
  return _CLASSES[method.lower()]


def with_stages():
  """Canonical names of the methods that have extra stages (an ``init_epochs`` default)."""
  return [m for m in available() if get(m).init_epochs is not None]


def engine_kwargs(cls, **providers):
  """The constructor keywords ``cls`` asks the engine for (``cls.engine_hparams``), each made by
  the zero-argument callable of the same name in ``providers`` (called only when asked for)."""
  missing = [name for name in cls.engine_hparams if name not in providers]
  if missing:
    raise ValueError(f"method {cls.method_name} asks the engine for {', '.join(missing)}, "
                     f"which this caller does not provide (it provides {', '.join(providers)})")
  return {name: providers[name]() for name in cls.engine_hparams}


def canonical_name(method):
  """``"kd"`` -> ``"ST"``: the registry's spelling of a method name."""
  get(method)
  return _CANONICAL[method.lower()]


def create(method, student, teacher, *, input_shape=(32, 32, 3), **hparams):
  """Build the distiller of ``method`` for a student/teacher pair and create all its weights.

  Call it inside ``strategy.scope()``. The teacher is frozen (``trainable = False``).
  ``hparams`` are the method's constructor keywords (``ce_weight``, ``kd_weight``,
  ``method_weight``, ``temperature``, ``init_epochs`` and its own); ``None`` values mean "the
  method's default". ``input_shape`` is the (H, W, C) of one image, used to build connectors.
  """
  cls = get(method)
  hparams = {k: v for k, v in hparams.items() if v is not None}
  accepted = cls.accepted_hparams()
  unknown = sorted(set(hparams) - set(accepted))
  if unknown:
    raise UsageError(f"method {cls.method_name} does not take {', '.join(unknown)}; "
                     f"accepted: {', '.join(accepted)}")
  if teacher is not None:
    teacher.trainable = False
  elif cls.reads_teacher(hparams.get("kd_weight")) and not hparams.get("peers"):
    raise UsageError(f"method {cls.method_name} needs a teacher")
  distiller = cls(student, teacher, **hparams)
  return distiller.setup(input_shape)
