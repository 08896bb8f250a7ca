"""Every method's loss as a pure function (METHODS.md §1-2, DESIGN.md contract 2).

Grouped by knowledge type: ``logits`` (response), ``features`` (feature maps), ``relations``
(relations between samples or layers). Re-exported flat: ``kd_tf2.losses.attention_transfer``.
"""
from kd_tf2.losses.logits import *  # noqa: F401,F403
from kd_tf2.losses.features import *  # noqa: F401,F403
from kd_tf2.losses.relations import *  # noqa: F401,F403
from kd_tf2.losses.online import *  # noqa: F401,F403
from kd_tf2.losses import logits as _logits, features as _features, relations as _relations
from kd_tf2.losses import online as _online

__all__ = (list(_logits.__all__) + list(_features.__all__) + list(_relations.__all__)
           + list(_online.__all__))
