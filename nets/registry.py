"""Name -> builder registry of the zoo (timm-style ``@register``), case-insensitive look-up.

Families with a parametric name (``wrn_<depth>_<width>``) register a pattern with
``register_pattern``; the registry itself knows no family.
"""
import functools
import re

_BUILDERS = {}
_PATTERNS = []  # (compiled regex, canonical(match) -> name | None, build(name, ...), hint)


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


def register_pattern(regex, canonical, build, hint):
  """Register a family of names matching ``regex`` (full match on the lower-cased name).

  canonical(match) -> the registry spelling, or None when the match is not a valid member;
  build(name, num_classes=..., **kw) -> ZooNet for a canonical name;
  hint: how the family reads in the unknown-name error, e.g. 'any wrn_<depth>_<width> ...'.
  """
  _PATTERNS.append((re.compile(regex), canonical, build, hint))


def available():
  """The registered names in registration order (pattern families are listed by ``hints()``)."""
  return list(_BUILDERS)


def hints():
  """One phrase per registered name pattern."""
  return [hint for _, _, _, hint in _PATTERNS]


def _pattern_match(lowered):
  for regex, canonical, build, _ in _PATTERNS:
    m = regex.fullmatch(lowered)
    name = canonical(m) if m else None
    if name:
      return name, build
  return None, None


def canonical_name(name):
  """The registry spelling of ``name`` (case-insensitive); ValueError listing the known names."""
  if isinstance(name, str):
    lowered = name.strip().lower()
    for key in _BUILDERS:
      if key.lower() == lowered:
        return key
    key, _ = _pattern_match(lowered)
    if key:
      return key
  extra = "".join(f" (and {hint})" for hint in hints())
  raise ValueError(f"unknown net {name!r}; known nets: {', '.join(available())}{extra}")


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
    _, build = _pattern_match(key.lower())
    builder = functools.partial(build, key)
  return builder(num_classes=num_classes, synchronized_bn=synchronized_bn, **kwargs)
