"""Tests for kd_tf2.optim: PyTorch's SGD rule in Keras 3 and the benchmark's step-decay schedule.

The reference below is an independent NumPy (float64) transcription of torch.optim.SGD's documented
update (dampening 0): g += wd*w; b = g on the first step, else b = mu*b + g;
d = g + mu*b if nesterov else b; w -= lr*d.
"""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from kd_tf2.optim import (  # noqa: E402
    StepDecay,
    TorchSGD,
    default_lr,
    scale_milestones,
    step_decay_schedule,
)


SHAPES = {"kernel": (3, 4), "bias": (4,), "gamma": (2,)}
RNG = np.random.default_rng(0)
INIT = {k: RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
# Coefficients exactly representable in float32, so the TF loss and the NumPy gradient agree.
A = {k: RNG.uniform(0.5, 2.0, size=s).astype(np.float32).astype(float) for k, s in SHAPES.items()}
C = {k: RNG.normal(size=s).astype(np.float32).astype(float) for k, s in SHAPES.items()}

# 10 steps; the learning rate drops x0.1 at step 4 and again at step 8.
LRS = [0.1] * 4 + [0.01] * 4 + [0.001] * 2
SCHEDULE = StepDecay(0.1, [4, 8], 0.1)


def grad_np(name, w):
    """Gradient of the fixed loss sum(0.5*A*w^2 + C*w + sin(w)), in float64."""
    return A[name] * w + C[name] + np.cos(w)


def loss_tf(variables):
    total = 0.0
    for name, v in variables.items():
        a, c = tf.constant(A[name], tf.float32), tf.constant(C[name], tf.float32)
        total += tf.reduce_sum(0.5 * a * tf.square(v) + c * v + tf.sin(v))
    return total


def torch_sgd_reference(lrs, momentum, weight_decay, nesterov=False, decayed=tuple(SHAPES)):
    """Independent NumPy transcription of torch.optim.SGD.step() over len(lrs) steps."""
    w = {k: v.astype(np.float64) for k, v in INIT.items()}
    buf = {k: None for k in w}
    for lr in lrs:
        for name in w:
            g = grad_np(name, w[name])
            if weight_decay and name in decayed:
                g = g + weight_decay * w[name]
            if momentum:
                buf[name] = g.copy() if buf[name] is None else momentum * buf[name] + g
                g = g + momentum * buf[name] if nesterov else buf[name]
            w[name] = w[name] - lr * g
    return w


def make_variables():
    return {k: keras.Variable(v.copy(), name=k) for k, v in INIT.items()}


def run_optimizer(optimizer, steps=len(LRS), mode="eager", variables=None):
    """Build `optimizer` on fresh variables (or `variables`) and take `steps` gradient steps."""
    variables = variables or make_variables()
    var_list = list(variables.values())
    optimizer.build(var_list)

    def step():
        with tf.GradientTape() as tape:
            loss = loss_tf(variables)
        optimizer.apply_gradients(zip(tape.gradient(loss, var_list), var_list))

    if mode == "function":
        step = tf.function(step)
    elif mode == "jit":
        step = tf.function(step, jit_compile=True)
    for _ in range(steps):
        step()
    return {k: v.numpy().astype(np.float64) for k, v in variables.items()}


def max_rel_err(got, want):
    return max(float(np.max(np.abs(got[k] - want[k]) / (1e-3 + np.abs(want[k])))) for k in want)


TOL = 2e-5  # float32 updates vs the float64 reference over 10 steps


# --------------------------------------------------------------------------------------------------
# The update rule


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
def test_matches_pytorch_rule_across_lr_drops(mode):
    want = torch_sgd_reference(LRS, momentum=0.9, weight_decay=5e-3)
    opt = TorchSGD(learning_rate=SCHEDULE, momentum=0.9, weight_decay=5e-3)
    got = run_optimizer(opt, mode=mode)
    assert max_rel_err(got, want) < TOL


def test_nesterov_and_plain_sgd_match_pytorch_rule():
    want = torch_sgd_reference(LRS, momentum=0.9, weight_decay=5e-3, nesterov=True)
    nesterov = TorchSGD(learning_rate=SCHEDULE, momentum=0.9, weight_decay=5e-3, nesterov=True)
    got = run_optimizer(nesterov)
    assert max_rel_err(got, want) < TOL
    want = torch_sgd_reference(LRS, momentum=0.0, weight_decay=5e-3)
    plain = TorchSGD(learning_rate=SCHEDULE, momentum=0.0, weight_decay=5e-3)
    got = run_optimizer(plain)
    assert max_rel_err(got, want) < TOL
    assert len(plain.variables) == 1  # only `iterations`: no momentum buffers without momentum


def test_reference_agrees_with_keras_sgd_where_the_rules_coincide():
    # Constant lr and no weight decay: Keras' velocity is exactly -lr * PyTorch's buffer. This
    # validates the reference's conventions (first-step buffer, sign, ordering) independently.
    want = torch_sgd_reference([0.1] * 10, momentum=0.9, weight_decay=0.0)
    got = run_optimizer(keras.optimizers.SGD(learning_rate=0.1, momentum=0.9))
    assert max_rel_err(got, want) < TOL


def test_keras_sgd_fails_the_same_check_after_a_drop():
    # Same comparison as test_matches_pytorch_rule_across_lr_drops, with Keras' SGD: its velocity
    # carries the old learning rate across the drop (and its weight decay is decoupled).
    want = torch_sgd_reference(LRS, momentum=0.9, weight_decay=0.0)
    keras_got = run_optimizer(keras.optimizers.SGD(learning_rate=SCHEDULE, momentum=0.9))
    assert max_rel_err(keras_got, want) > 100 * TOL
    ours = run_optimizer(TorchSGD(learning_rate=SCHEDULE, momentum=0.9, weight_decay=0.0))
    assert max_rel_err(ours, want) < TOL


def test_velocity_is_not_rescaled_at_the_drop():
    # Take 4 steps at lr 0.1, then one at 0.01: the 5th update must be exactly 0.01 * buffer.
    opt = TorchSGD(learning_rate=SCHEDULE, momentum=0.9, weight_decay=0.0)
    variables = make_variables()
    before = run_optimizer(opt, steps=4, variables=variables)
    grads = {k: grad_np(k, before[k]) for k in before}
    buffers = {k: b.numpy().astype(np.float64) for k, b in zip(INIT, opt.momentums)}
    run_optimizer(opt, steps=1, variables=variables)
    for k in INIT:
        expected_update = -0.01 * (0.9 * buffers[k] + grads[k])
        update = variables[k].numpy() - before[k]
        np.testing.assert_allclose(update, expected_update, rtol=1e-4, atol=1e-7)
    assert float(opt.learning_rate) == pytest.approx(0.01)


def test_coupled_weight_decay_and_exclusions():
    want = torch_sgd_reference(LRS, momentum=0.9, weight_decay=5e-2, decayed=("kernel",))
    variables = make_variables()
    opt = TorchSGD(learning_rate=SCHEDULE, momentum=0.9, weight_decay=5e-2)
    opt.exclude_from_weight_decay(var_list=[variables["gamma"]], var_names=["bias"])
    got = run_optimizer(opt, variables=variables)
    assert max_rel_err(got, want) < TOL
    # ... and not what decaying everything would give.
    assert max_rel_err(got, torch_sgd_reference(LRS, momentum=0.9, weight_decay=5e-2)) > 100 * TOL


def test_zero_gradient_shows_coupled_decay_only_on_included_variables():
    variables = make_variables()
    opt = TorchSGD(learning_rate=0.1, momentum=0.9, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_names=["bias"])
    var_list = list(variables.values())
    opt.build(var_list)
    zeros = [tf.zeros_like(v) for v in var_list]
    opt.apply(zeros, var_list)  # b = wd*w, w -= lr*b
    opt.apply(zeros, var_list)  # b = mu*b + wd*w', w' -= lr*b
    np.testing.assert_array_equal(variables["bias"].numpy(), INIT["bias"])
    for k in ("kernel", "gamma"):
        w1 = INIT[k] * (1 - 0.1 * 0.5)
        w2 = w1 - 0.1 * (0.9 * 0.5 * INIT[k] + 0.5 * w1)
        np.testing.assert_allclose(variables[k].numpy(), w2, rtol=1e-6)


def test_exclusion_after_build_is_refused():
    opt = TorchSGD()
    opt.build(list(make_variables().values()))
    with pytest.raises(ValueError, match="before the optimizer is built"):
        opt.exclude_from_weight_decay(var_names=["bias"])


def test_loss_scale_optimizer_wrapping():
    want = torch_sgd_reference(LRS, momentum=0.9, weight_decay=5e-3)
    variables = make_variables()
    var_list = list(variables.values())
    opt = keras.optimizers.LossScaleOptimizer(TorchSGD(learning_rate=SCHEDULE, weight_decay=5e-3))
    opt.build(var_list)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            scaled = opt.scale_loss(loss_tf(variables))
        opt.apply_gradients(zip(tape.gradient(scaled, var_list), var_list))

    for _ in LRS:
        step()
    got = {k: v.numpy().astype(np.float64) for k, v in variables.items()}
    assert max_rel_err(got, want) < TOL
    assert int(opt.iterations) == len(LRS)


@pytest.mark.parametrize(
    "kwargs",
    [{"momentum": 1.0}, {"momentum": -0.1}, {"weight_decay": -1e-4}, {"learning_rate": -0.1},
     {"momentum": 0.0, "nesterov": True}],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        TorchSGD(**kwargs)


# --------------------------------------------------------------------------------------------------
# Serialization and checkpoints


def test_config_round_trip_with_schedule():
    opt = TorchSGD(
        learning_rate=step_decay_schedule(0.05, 8, 10),
        momentum=0.8,
        weight_decay=1e-3,
        nesterov=True,
    )
    clone = keras.optimizers.deserialize(json.loads(json.dumps(keras.optimizers.serialize(opt))))
    assert isinstance(clone, TorchSGD)
    assert (clone.momentum, clone.weight_decay, clone.nesterov) == (0.8, 1e-3, True)
    assert isinstance(clone._learning_rate, StepDecay)
    for step in (0, 49, 50, 59, 60, 70, 79):
        assert float(clone._learning_rate(step)) == float(opt._learning_rate(step))
    assert float(opt._learning_rate(50)) == pytest.approx(0.005)


def test_checkpoint_round_trip(tmp_path):
    def fresh():
        variables = make_variables()
        opt = TorchSGD(learning_rate=SCHEDULE, weight_decay=5e-3)
        opt.build(list(variables.values()))
        return variables, opt

    variables, opt = fresh()
    run_optimizer(opt, steps=6, variables=variables)
    path = tf.train.Checkpoint(optimizer=opt, **variables).save(str(tmp_path / "ckpt"))

    variables2, opt2 = fresh()
    tf.train.Checkpoint(optimizer=opt2, **variables2).restore(path).assert_consumed()
    assert int(opt2.iterations) == 6
    assert float(opt2.learning_rate) == pytest.approx(0.01)
    for b1, b2 in zip(opt.momentums, opt2.momentums):
        assert np.any(b1.numpy() != 0)
        np.testing.assert_array_equal(b1.numpy(), b2.numpy())
    # Continuing from the restored state equals an uninterrupted 10-step run.
    got = run_optimizer(opt2, steps=4, variables=variables2)
    assert max_rel_err(got, torch_sgd_reference(LRS, momentum=0.9, weight_decay=5e-3)) < TOL




# --------------------------------------------------------------------------------------------------
# Schedule


def repdistiller_lr(base_lr, epoch0, milestones, gamma=0.1):
    """RepDistiller's adjust_learning_rate for a 0-based epoch (it counts epochs from 1)."""
    return base_lr * gamma ** int(np.sum(epoch0 + 1 > np.asarray(milestones)))


def test_schedule_240_epochs_matches_reference_per_step():
    steps_per_epoch = 3
    schedule = step_decay_schedule(0.05, 240, steps_per_epoch)
    assert schedule.boundaries == [450, 540, 630]
    steps = tf.range(240 * steps_per_epoch, dtype=tf.int64)
    got = tf.map_fn(schedule, steps, fn_output_signature=tf.float32).numpy()
    epochs0 = np.arange(len(got)) // steps_per_epoch
    want = np.array([repdistiller_lr(0.05, e, (150, 180, 210)) for e in epochs0])
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=0, atol=0)
    assert got[449] == np.float32(0.05) and got[450] == np.float32(0.005)


@pytest.mark.parametrize(
    "epochs, expected",
    [(240, (150, 180, 210)), (8, (5, 6, 7)), (30, (19, 23, 26)), (4, (3, 3, 4)), (1, (1, 1, 1)),
     (120, (75, 90, 105)), (10, (6, 8, 9))],
)
def test_scaled_milestones(epochs, expected):
    # Hand-computed from the documented rule: nearest epoch to 62.5/75/87.5% of `epochs`, halves up.
    assert scale_milestones(epochs) == expected


def test_short_run_schedule_decays_at_scaled_epochs():
    schedule = step_decay_schedule(0.1, 8, 5)
    lrs = [float(schedule(s)) for s in range(40)]
    assert lrs[:25] == [pytest.approx(0.1)] * 25
    assert lrs[25:30] == [pytest.approx(0.01)] * 5
    assert lrs[30:35] == [pytest.approx(0.001)] * 5
    assert lrs[35:] == [pytest.approx(1e-4)] * 5
    coincide = step_decay_schedule(0.1, 4, 2)  # milestones (3, 3, 4): two decays at epoch 3
    assert float(coincide(5)) == pytest.approx(0.1) and float(coincide(6)) == pytest.approx(1e-3)


def test_schedule_config_round_trip():
    schedule = step_decay_schedule(0.01, 30, 7, gamma=0.2)
    clone = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert isinstance(clone, StepDecay)
    assert clone.get_config() == {"base_lr": 0.01, "boundaries": [133, 161, 182], "gamma": 0.2}
    # NumPy integers (e.g. a dataset's cardinality) are accepted and stored as plain ints.
    from_numpy = step_decay_schedule(0.1, np.int64(8), np.int64(5))
    assert json.dumps(from_numpy.get_config()) == json.dumps(
        {"base_lr": 0.1, "boundaries": [25, 30, 35], "gamma": 0.1}
    )


@pytest.mark.parametrize(
    "call",
    [lambda: step_decay_schedule(0.05, 0, 10), lambda: step_decay_schedule(0.05, 10, 0),
     lambda: step_decay_schedule(-1.0, 10, 10), lambda: scale_milestones(10, (180, 150)),
     lambda: StepDecay(0.1, [5, 2]), lambda: default_lr(None)],
)
def test_schedule_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


def test_default_lr():
    for arch in ("MobileNetV2", "mobilenetv2", "ShuffleV1", "SHUFFLEV2"):
        assert default_lr(arch) == 0.01
    for arch in ("resnet8x4", "wrn_16_2", "vgg8", "ResNet50", "MobileNetV2_x2"):
        assert default_lr(arch) == 0.05
