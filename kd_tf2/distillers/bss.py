"""BSS - distillation with adversarial samples supporting the decision boundary.

Heo, Lee, Yun, Choi, "Knowledge Distillation with Adversarial Samples Supporting Decision
Boundary", AAAI 2019, arXiv:1805.05532. METHODS.md §4 (Zoo procedure), per batch and replica:

1. candidates: samples both nets classify correctly; when more than ``attack_size`` (32), the 32
   with the largest sum over the non-target classes of (p_t - p_s)^2;
2. attack class: drawn from the teacher's non-top-1 classes with probability proportional to the
   teacher's softmax;
3. attack the teacher (inference mode) for up to ``attack_steps`` (10) steps on the objective
   p_attack - p_target: x <- clip(x + eta * (p_target - p_attack + 1e-4) * g / ||g||_2, -2.5, 2.5),
   eta = 0.3, only for samples the teacher still assigns to the target; stop when none is left;
4. L_bss = (1/A) sum_a KL(softmax(z_t(x_a)/T) || softmax(z_s(x_a)/T)) over the A attacked samples,
   T = 3 (``temperature``), **without** T^2; the student runs in training mode (as in the Zoo).
   A soft-target term added with ``kd_weight`` uses the same temperature.

Schedule (Zoo, 1-based epoch e): lambda = 0 for e <= 10, then 2 * max(1 - (5/4)(e - 1)/epochs, 0)
(zero from 80% of training on); with the engine's 0-based ``self.epoch`` that is
``method_weight * max(1 - 1.25 * epoch / epochs, 0)`` once ``epoch >= warmup_epochs`` (10).
While lambda is 0, or no sample is a candidate, the attack and the teacher's extra forward pass
are skipped (the term is 0). Deviation: the student's forward pass on the selected rows runs on
every step (on the clean rows when nothing is attacked), because with synchronised BatchNorm it
all-reduces across replicas, which cannot happen inside a data-dependent branch under
MirroredStrategy; it costs one extra forward/backward on <= ``attack_size`` rows and updates the
student's BatchNorm moving statistics once more per step (with clean rows of the same batch
during warm-up, where the Zoo does not run it).
Per replica: candidates, attack and loss use the replica's own batch (the loss is the mean over
its attacked samples; a replica without candidates contributes 0).

Fixed shapes (everything runs inside ``tf.function``, XLA-compilable): instead of gathering a
data-dependent number of candidates, the step takes the top ``min(attack_size, B)`` rows by the
selection score (non-candidates score -inf) and carries a validity mask; the attack leaves invalid
rows unchanged and the loss averages over valid rows only. Deviation: when fewer than
``attack_size`` samples are candidates, the padding rows (clean images) still go through the
student's adversarial forward pass, so they enter its BatchNorm batch statistics (the Zoo forwards
only the attacked samples); the loss is unaffected. The gradient norm is floored at 1e-12 (a
saturated teacher softmax gives g = 0, where the Zoo divides by zero).
"""
import tensorflow as tf

from kd_tf2 import losses as kd_losses
from kd_tf2.checks import is_int, is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller, StepOutput, arch_name as _arch
from kd_tf2.errors import UsageError

_NEG = -1e9  # logit of the excluded classes when sampling (exp underflows to exactly 0)


def _pick(matrix, columns):
  """matrix[b, columns[b]] for [B, K] and int [B]."""
  return tf.gather(matrix, tf.cast(columns, tf.int32), axis=1, batch_dims=1)


def select_candidates(s_logits, t_logits, labels, size):
  """Rows to attack: (rows int32 [A], valid bool [A]) with A = ``size``.

  Valid rows are the candidates (both nets correct) with the largest
  sum_{k != y} (p_t - p_s)^2, best first; invalid rows pad the selection.
  """
  labels = tf.cast(labels, tf.int64)
  correct = (tf.argmax(s_logits, axis=1) == labels) & (tf.argmax(t_logits, axis=1) == labels)
  diff = tf.square(tf.nn.softmax(t_logits) - tf.nn.softmax(s_logits))
  score = tf.reduce_sum(diff, axis=1) - _pick(diff, labels)
  score = tf.where(correct, score, tf.fill(tf.shape(score), float("-inf")))
  _, rows = tf.math.top_k(score, k=size)
  return rows, tf.gather(correct, rows)


def sample_attack_class(t_logits):
  """One class per row, drawn among the non-top-1 classes with probability prop. to softmax(t)."""
  top = tf.one_hot(tf.argmax(t_logits, axis=1), tf.shape(t_logits)[1]) > 0.5
  masked = tf.where(top, tf.fill(tf.shape(t_logits), _NEG), t_logits)
  return tf.random.categorical(masked, 1, dtype=tf.int32)[:, 0]


def boundary_attack(logits_fn, images, target, attack_class, active, *, steps=10, step_size=0.3,
                    eps=1e-4, clip=2.5):
  """Zoo's BSS attack: move ``images`` [A, H, W, C] from ``target`` towards ``attack_class``.

  logits_fn: images -> [A, K] logits (the teacher, inference mode). ``active`` bool [A]: rows that
  may move. Each step moves the rows the model still assigns to ``target``; the loop stops early
  when no row moves (the images are then returned unchanged by that step, as the Zoo breaks).
  """
  target = tf.cast(target, tf.int32)
  attack_class = tf.cast(attack_class, tf.int32)

  def body(step, x, _):
    with tf.GradientTape() as tape:
      tape.watch(x)
      logits = tf.cast(logits_fn(x), tf.float32)
      p = tf.nn.softmax(logits)
      p_target, p_attack = _pick(p, target), _pick(p, attack_class)
      objective = tf.reduce_sum(p_attack - p_target)
    grad = tape.gradient(objective, x)
    moving = active & (tf.argmax(logits, axis=1, output_type=tf.int32) == target)
    alpha = step_size * tf.cast(moving, tf.float32)
    norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3], keepdims=True))
    scale = tf.reshape(alpha * (p_target - p_attack + eps), [-1, 1, 1, 1])
    stepped = tf.clip_by_value(x + scale * grad / tf.maximum(norm, 1e-12), -clip, clip)
    done = tf.logical_not(tf.reduce_any(moving))
    return step + 1, tf.where(done, x, stepped), done

  def keep_going(step, x, done):
    del x
    return (step < steps) & tf.logical_not(done)

  _, adversarial, _ = tf.while_loop(
      keep_going, body, (tf.constant(0), tf.cast(images, tf.float32), tf.constant(False)))
  return tf.stop_gradient(adversarial)


@register("BSS")
class BSS(Distiller):
  """{"bss": lambda(epoch) * KL_T(teacher || student) on boundary-supporting samples}."""
  method_weight = 2.0
  temperature = 3.0

  def __init__(self, student, teacher, *, attack_size=32, attack_steps=10, step_size=0.3,
               warmup_epochs=10, **kwargs):
    super().__init__(student, teacher, **kwargs)
    lowest = dict(attack_size=1, attack_steps=0, warmup_epochs=0)
    values = dict(attack_size=attack_size, attack_steps=attack_steps, warmup_epochs=warmup_epochs)
    for key, value in values.items():
      if not is_int(value) or value < lowest[key]:
        raise UsageError(f"{key}={value!r} for method BSS: must be an integer >= {lowest[key]}")
    if not is_number(step_size) or step_size <= 0:
      raise UsageError(f"step_size={step_size!r} for method BSS: must be a number > 0")
    self.attack_size, self.attack_steps = attack_size, attack_steps
    self.step_size, self.warmup_epochs = float(step_size), warmup_epochs

  def build_connectors(self, s, t):
    k_s, k_t = int(s.logits.shape[-1]), int(t.logits.shape[-1])
    if k_s != k_t:
      raise UsageError(f"BSS needs the same classes in both nets: {_arch(self.student)} has "
                       f"{k_s}, {_arch(self.teacher)} has {k_t}")
    if k_s < 2:
      raise UsageError(f"BSS needs at least 2 classes to pick an attack class; {k_s} given")

  def weight(self):
    """lambda of the running epoch (float32 scalar): 0 during warm-up, then a linear decay."""
    epoch = tf.cast(self.epoch, tf.float32)
    ramp = tf.maximum(1.0 - 1.25 * epoch / float(max(self.epochs, 1)), 0.0)
    return tf.where(epoch < float(self.warmup_epochs), 0.0, self.method_weight * ramp)

  def attack_classes(self, t_logits, rows, batch=None):
    """int32 [A]: the attack class of each selected row. Drawn by ``sample_attack_class`` unless
    the batch carries ``"bss_attack_class"`` (int [B], one class per sample: a replay of fixed
    draws, e.g. the step-parity fixture of the Zoo's own draws)."""
    if batch is not None and "bss_attack_class" in batch:
      return tf.gather(tf.cast(batch["bss_attack_class"], tf.int32), rows)
    return sample_attack_class(tf.gather(t_logits, rows))

  def boundary_loss(self, images, labels, s_logits, t_logits, weight, batch=None):
    """weight * L_bss of one batch (0 while the weight is 0 or no sample is a candidate)."""
    rows_in = images.shape[0] if images.shape[0] is not None else tf.shape(images)[0]
    size = (min(self.attack_size, rows_in) if isinstance(rows_in, int)
            else tf.minimum(self.attack_size, rows_in))
    rows, valid = select_candidates(tf.stop_gradient(s_logits), t_logits, labels, size)
    chosen = tf.gather(images, rows)
    run = (weight > 0) & tf.reduce_any(valid)

    def attack():  # teacher only (inference mode: no cross-replica op inside the branch)
      target = tf.gather(tf.cast(labels, tf.int32), rows)
      attack_class = self.attack_classes(t_logits, rows, batch)

      def teacher_logits(x):
        return self.teacher(x, training=False)

      x_adv = boundary_attack(teacher_logits, chosen, target, attack_class, valid,
                              steps=self.attack_steps, step_size=self.step_size)
      return x_adv, tf.cast(self.teacher(x_adv, training=False), tf.float32)

    def skip():
      return chosen, tf.zeros([tf.shape(rows)[0], tf.shape(t_logits)[1]], tf.float32)

    x_adv, z_t = tf.cond(run, attack, skip)
    # Outside the cond: with synchronised BatchNorm the student's forward all-reduces, which
    # MirroredStrategy cannot do inside control flow, and every replica must run it together.
    z_s = tf.cast(self.student(x_adv, training=True), tf.float32)
    mask = valid & run
    return weight * kd_losses.kl_without_t2(z_s, tf.stop_gradient(z_t), self.temperature, mask)

  def train_step(self, batch, ctx):
    images = tf.cast(batch["image"], tf.float32)
    labels = batch["label"]
    t = self.teacher_outputs(images)
    weight = self.weight()
    with tf.GradientTape() as tape:
      s = self.student_outputs(images, training=True)
      terms = self.total_terms(s, t, batch, training=True)
      terms["bss"] = self.boundary_loss(images, labels, s.logits, t.logits, weight, batch)
      loss = tf.add_n(list(terms.values()))
    ctx.minimize(loss, tape)
    return StepOutput(terms, s.logits)
