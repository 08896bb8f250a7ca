"""The reference benchmark's optimiser and learning-rate schedule, for Keras 3.

The reference benchmark (Tian, Krishnan, Isola, "Contrastive Representation Distillation",
ICLR 2020, arXiv:1910.10699, and its RepDistiller code) trains every student with PyTorch's
``torch.optim.SGD`` (momentum 0.9, weight decay 5e-4) and multiplies the learning rate by 0.1 at
epochs 150, 180 and 210 of 240 (METHODS.md §3). Keras' own ``SGD`` differs in two ways that change
published numbers:

* its ``weight_decay`` is decoupled (``w -= lr * wd * w`` outside the momentum), while PyTorch adds
  ``wd * w`` to the gradient before the momentum buffer;
* its velocity stores ``-lr * g``, so after a learning-rate drop the old learning rate keeps
  acting through the velocity, while PyTorch's buffer holds gradients only and the new rate
  applies at once.

``TorchSGD`` implements PyTorch's rule; ``step_decay_schedule`` builds the benchmark's schedule.
"""

import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

__all__ = ["TorchSGD", "StepDecay", "step_decay_schedule", "scale_milestones", "default_lr"]

# RepDistiller's train_student.py lowers the learning rate to 0.01 for these students.
_LOW_LR_ARCHS = ("mobilenetv2", "shufflev1", "shufflev2")


def _is_int(value):
    """True for Python and NumPy integers (not bools)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value):
    """True for Python and NumPy reals (not bools)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


@keras.saving.register_keras_serializable(package="kd_tf2")
class TorchSGD(keras.optimizers.Optimizer):
    """PyTorch's ``torch.optim.SGD`` update rule (dampening 0) as a Keras 3 optimiser.

    For each variable ``w`` with gradient ``g`` (any shape; buffer ``b`` has the shape of ``w``)::

        g <- g + weight_decay * w          (coupled L2; skipped for excluded variables)
        b <- momentum * b + g              (b starts at 0, so the first step gives b = g,
                                            exactly PyTorch's buffer initialised with g)
        d <- g + momentum * b  if nesterov else  b
        w <- w - lr * d

    ``lr`` is the learning rate of the current step (a float or a
    ``keras.optimizers.schedules.LearningRateSchedule`` called with ``iterations``); because ``b``
    carries no learning rate, a step decay takes full effect at the step it happens, as in PyTorch.
    With ``momentum=0`` no buffers are created and ``w <- w - lr * (g + weight_decay * w)``.

    Weight decay applies to every variable the optimiser is built with (PyTorch's single parameter
    group), except those given to ``exclude_from_weight_decay(var_list=..., var_names=...)``
    (Keras' method: ``var_names`` are substrings/regexes searched in each variable's ``name``). Call
    it before ``build``; with a ``LossScaleOptimizer`` call it on this (inner) optimiser.

    Defaults are the benchmark's (lr 0.05, momentum 0.9, weight decay 5e-4), not PyTorch's.
    Other keyword arguments (``name``, ``clipnorm``, ``global_clipnorm``, ``clipvalue``,
    ``gradient_accumulation_steps``, ...) go to ``keras.optimizers.Optimizer``.
    Variables (for ``tf.train.Checkpoint``): ``iterations``, the learning rate when it is a float,
    and one momentum buffer per variable.
    """

    def __init__(
        self, learning_rate=0.05, momentum=0.9, weight_decay=5e-4, nesterov=False, **kwargs
    ):
        if _is_number(learning_rate):
            learning_rate = float(learning_rate)
            if not learning_rate >= 0.0:
                raise ValueError(f"learning_rate must be >= 0, got {learning_rate!r}")
        if not (_is_number(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}")
        if weight_decay is None:
            weight_decay = 0.0
        if not (_is_number(weight_decay) and weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be a float >= 0 (or None), got {weight_decay!r}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov=True requires momentum > 0 (as in torch.optim.SGD)")
        super().__init__(learning_rate=learning_rate, weight_decay=float(weight_decay), **kwargs)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def build(self, variables):
        """Creates one zero momentum buffer per variable (none when momentum is 0)."""
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum != 0.0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")
        # Decide weight decay per variable now, on the variables as given (under a distribution
        # strategy the update step later sees per-replica copies, which map to the same cache key).
        for variable in variables:
            self._use_weight_decay(variable)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Keras' exclusion, refused once built (the update step may already be traced)."""
        if self.built:
            raise ValueError(
                "exclude_from_weight_decay() must be called before the optimizer is built; "
                f"optimizer {self.name!r} is already built"
            )
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)

    def _apply_weight_decay(self, variables):
        # Keras' decoupled decay (w -= lr * wd * w) is disabled: the decay is coupled into the
        # gradient in update_step, as PyTorch does.
        return

    def update_step(self, gradient, variable, learning_rate):
        """One PyTorch SGD step on one variable (``gradient`` already summed over replicas)."""
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        grad = ops.cast(gradient, dtype)
        if self.weight_decay and self._use_weight_decay(variable):
            grad = ops.add(grad, ops.multiply(ops.cast(self.weight_decay, dtype), variable))
        if self.momentum == 0.0:
            self.assign_sub(variable, ops.multiply(lr, grad))
            return
        momentum = ops.cast(self.momentum, dtype)
        buf = self.momentums[self._get_variable_index(variable)]
        new_buf = ops.add(ops.multiply(momentum, buf), grad)
        self.assign(buf, new_buf)
        direction = ops.add(grad, ops.multiply(momentum, new_buf)) if self.nesterov else new_buf
        self.assign_sub(variable, ops.multiply(lr, direction))

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config


@keras.saving.register_keras_serializable(package="kd_tf2")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise-constant decay: ``lr(step) = base_lr * gamma ** #{b in boundaries : step >= b}``.

    ``step`` is the optimiser's ``iterations`` (a scalar integer tensor: the number of updates done
    before this one), so the learning rate changes *at* each boundary step, like PyTorch's
    ``MultiStepLR`` stepped per epoch with boundaries ``milestone * steps_per_epoch``. Repeated
    boundaries decay more than once. Each level is computed in Python float64 as
    ``base_lr * gamma ** k`` (RepDistiller's ``adjust_learning_rate``) and then cast to float32.
    """

    def __init__(self, base_lr, boundaries, gamma=0.1):
        if not (_is_number(base_lr) and base_lr > 0):
            raise ValueError(f"base_lr must be a number > 0, got {base_lr!r}")
        if not (_is_number(gamma) and gamma > 0):
            raise ValueError(f"gamma must be a number > 0, got {gamma!r}")
        boundaries = list(boundaries)
        if not all(_is_int(b) and b >= 0 for b in boundaries):
            raise ValueError(f"boundaries must be integers >= 0, got {boundaries!r}")
        if boundaries != sorted(boundaries):
            raise ValueError(f"boundaries must be non-decreasing, got {boundaries!r}")
        self.base_lr = float(base_lr)
        self.boundaries = [int(b) for b in boundaries]
        self.gamma = float(gamma)
        self._levels = [self.base_lr * self.gamma**k for k in range(len(boundaries) + 1)]

    def __call__(self, step):
        step = ops.cast(step, "int64")
        if not self.boundaries:
            return ops.cast(self._levels[0], "float32")
        passed = ops.greater_equal(step, ops.convert_to_tensor(self.boundaries, dtype="int64"))
        k = ops.sum(ops.cast(passed, "int32"))
        return ops.take(ops.convert_to_tensor(self._levels, dtype="float32"), k)

    def get_config(self):
        return {"base_lr": self.base_lr, "boundaries": list(self.boundaries), "gamma": self.gamma}


def scale_milestones(epochs, milestones=(150, 180, 210), total_reference_epochs=240):
    """Milestone epochs of a ``total_reference_epochs`` schedule moved to a run of ``epochs``.

    Each milestone ``m`` becomes ``floor(m * epochs / total_reference_epochs + 0.5)`` (the nearest
    epoch, halves rounded up), so the decays keep their fraction of training (62.5%, 75%, 87.5% for
    the defaults). When ``epochs == total_reference_epochs`` the milestones are returned unchanged.
    Milestones may coincide in short runs (e.g. 4 epochs -> (3, 3, 4): two decays at epoch 3), and a
    milestone equal to ``epochs`` never takes effect (a 1-epoch run keeps ``base_lr``). Epochs are
    0-based: milestone ``m`` means epochs ``m, m+1, ...`` run at the decayed rate, as in
    RepDistiller (1-based ``epoch > m``) and PyTorch's ``MultiStepLR``.
    """
    for arg, value in (("epochs", epochs), ("total_reference_epochs", total_reference_epochs)):
        if not (_is_int(value) and value >= 1):
            raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
    milestones = tuple(milestones)
    epochs, total = int(epochs), int(total_reference_epochs)
    if not all(_is_int(m) and m >= 0 for m in milestones):
        raise ValueError(f"milestones must be integers >= 0, got {milestones!r}")
    if list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be non-decreasing, got {milestones!r}")
    # Integer arithmetic: floor(m * e / T + 1/2) == (2 * m * e + T) // (2 * T), no float rounding.
    return tuple((2 * int(m) * epochs + total) // (2 * total) for m in milestones)


def step_decay_schedule(
    base_lr,
    epochs,
    steps_per_epoch,
    milestones=(150, 180, 210),
    total_reference_epochs=240,
    gamma=0.1,
):
    """The benchmark's schedule as a ``StepDecay``: ``base_lr`` times ``gamma`` at each milestone.

    Milestones are epochs of a ``total_reference_epochs``-epoch run and are moved to ``epochs`` by
    ``scale_milestones`` (nearest epoch, halves up); the decay happens at the first step of that
    epoch, i.e. at step ``milestone * steps_per_epoch``. Serializable like any Keras schedule.
    """
    if not (_is_int(steps_per_epoch) and steps_per_epoch >= 1):
        raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
    scaled = scale_milestones(epochs, milestones, total_reference_epochs)
    return StepDecay(base_lr, [m * int(steps_per_epoch) for m in scaled], gamma)


def default_lr(student_arch):
    """The benchmark's base learning rate: 0.01 for MobileNetV2/ShuffleV1/ShuffleV2, else 0.05.

    ``student_arch`` is a model name (matched case-insensitively, as in ``nets.create``).
    """
    if not isinstance(student_arch, str) or not student_arch:
        raise ValueError(f"student_arch must be a non-empty model name, got {student_arch!r}")
    return 0.01 if student_arch.lower() in _LOW_LR_ARCHS else 0.05
