"""Name -> builder registry of the zoo (timm-style ``@register``), case-insensitive look-up.

Besides the registered names, any ``wrn_<depth>_<width>`` resolves to a Wide ResNet
(depth = 6n + 4, NETS.md §2.3).
"""
import functools
import re

_BUILDERS = {}
_WRN = re.compile(r"wrn_(\d+)_(\d+)")


def register(fn=None, *, name=None):
  """Decorator: register ``fn(num_classes=100, **kw) -> ZooNet`` under ``name`` (default fn.__name__).

  The registered builder sets ``arch`` to the registered name unless the caller passes one.
  """
  def deco(f):
    key = name or f.__name__
    if key.lower() in {k.lower() for k in _BUILDERS}:
      raise ValueError(f"net name {key!r} is already registered")

    @functools.wraps(f)
    def builder(num_classes=100, **kwargs):
      kwargs.setdefault("arch", key)
      return f(num_classes=num_classes, **kwargs)

    _BUILDERS[key] = builder
    return builder

  return deco(fn) if fn is not None else deco


def available():
  """The registered names in registration order (any wrn_<depth>_<width> works as well)."""
  return list(_BUILDERS)


def canonical_name(name):
  """The registry spelling of ``name`` (case-insensitive); ValueError listing the known names."""
  if isinstance(name, str):
    lowered = name.strip().lower()
    for key in _BUILDERS:
      if key.lower() == lowered:
        return key
    m = _WRN.fullmatch(lowered)
    if m:
      depth, width = int(m.group(1)), int(m.group(2))
      if depth >= 10 and (depth - 4) % 6 == 0 and width >= 1:
        return f"wrn_{depth}_{width}"
  raise ValueError(f"unknown net {name!r}; known nets: {', '.join(available())} "
                   "(and any wrn_<depth>_<width> with depth = 6n + 4 >= 10, width >= 1)")


def create(name, num_classes=100, *, synchronized_bn=False, **kwargs):
  """Build the zoo net ``name`` (case-insensitive) for ``num_classes`` classes.

  synchronized_bn=True builds every BatchNormalization with ``synchronized=True`` (cross-replica
  statistics under a multi-replica tf.distribute strategy). Other keyword arguments go to the
  family's constructor. The model's ``arch`` attribute is the canonical name.
  """
  key = canonical_name(name)
  if key in _BUILDERS:
    builder = _BUILDERS[key]
  else:
    from nets.wrn import wide_resnet  # pylint: disable=import-outside-toplevel
    m = _WRN.fullmatch(key)
    builder = functools.partial(wide_resnet, int(m.group(1)), int(m.group(2)), arch=key)
  return builder(num_classes=num_classes, synchronized_bn=synchronized_bn, **kwargs)
