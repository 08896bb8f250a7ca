"""FT - factor transfer: a paraphraser trained on the teacher, a translator trained with the student.

Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
NeurIPS 2018, arXiv:1802.04977. METHODS.md §2.13 / §3 / §5.8; modules as RepDistiller's
``Paraphraser`` / ``Translator``:

* Position: the last stage output ``Outputs.features[-1]`` (RepDistiller ``feat[-2]``), teacher
  [B, Ht, Wt, Ct], student [B, Hs, Ws, Cs]; m = int(rate * Ct) factor channels (rate k = 0.5).
* Paraphraser (teacher side): encoder conv3x3 Ct->Ct, Ct->m, m->m, decoder transposed conv3x3
  m->m, m->Ct, Ct->Ct (stride 1, padding 1, bias), each followed by LeakyReLU(0.1), no BN.
* ``paraphraser`` stage (``init_epochs``, default 30): the paraphraser alone learns to
  reconstruct the teacher map, loss MSE(decoder(encoder(t)), t) (RepDistiller ``nn.MSELoss``;
  teacher maps with a large mean square make it diverge at lr 0.01 - lower ``paraphraser_lr``
  then); the student does not run. Its
  learning rate is 0.01 for ResNet/WRN students and the base rate otherwise (RepDistiller's rule;
  ``paraphraser_lr`` overrides it). Afterwards the paraphraser is frozen (never optimised in the
  main phase; it has no BN, so its mode does not matter).
* Translator (student side, trained with the student): conv3x3 Cs->Cs, Cs->m, m->m, each BN +
  LeakyReLU(0.1).
* Main phase: CE + method_weight * L, weight 200, RepDistiller's ``FactorTransfer(p1=2, p2=1)``
  (``distiller_zoo/FT.py``) on F_s = translator(f_s), F_t = encoder(f_t) [B, H, W, m]: the taller
  factor is average-pooled to the other's height, a(F) = normalize(mean_c F^2) flattened to
  [B, H*W] (l2, max(||.||, 1e-12)), L = mean |a(F_s) - a(F_t)|^p with p = 1. RepDistiller is the
  reference followed whole (modules, schedule, both losses). The paper's and Zoo's loss (L1 of the
  l2-normalised flattened factors, METHODS.md §2.13, ``kd_tf2.losses.factor_transfer``) is not used.

Paraphraser and translator are layers of the distiller: checkpointed with the run (a run resumed
after the stage keeps the trained paraphraser), never exported. Per replica: the loss is a mean
over this replica's samples; the translator's BN is synchronized when the student's is.
"""
import keras
import tensorflow as tf

from kd_tf2.checks import is_number
from kd_tf2.distillers import register
from kd_tf2.distillers.base import Distiller, Stage, arch_name as _arch
from kd_tf2.errors import UsageError
from nets import layers as torch_layers
from op_util import pool_to_match
from op_util.ops import l2_normalize

_SLOPE = 0.1


def _leaky_relu(x):
  """LeakyReLU(0.1) written as max(x, 0.1 x): same values and gradients, and it keeps grappler's
  remapper from trying (and loudly failing) to fuse it with the conv's bias in the gradient."""
  return tf.maximum(x, _SLOPE * x)


def _attention_factor(f):
  """RepDistiller ``FactorTransfer.factor`` (p1 = 2): [B, H, W, C] -> l2-normalised mean_c f^2,
  flattened to [B, H*W]."""
  a = tf.reshape(tf.reduce_mean(tf.square(f), axis=-1), [tf.shape(f)[0], -1])
  return l2_normalize(a, axis=1)


def _torch_uniform(fan_in):
  """PyTorch's default bias init U(+-1/sqrt(fan_in))."""
  return torch_layers.uniform(1.0 / fan_in ** 0.5)


def _conv3x3(cin, cout, name):
  """``nn.Conv2d(cin, cout, 3, 1, 1)`` with PyTorch's default init (kernel and bias)."""
  return torch_layers.Conv2D(cout, 3, strides=1, pad=1, use_bias=True,
                             bias_initializer=_torch_uniform(cin * 9), name=name)


def _deconv3x3(cout, name):
  """``nn.ConvTranspose2d(cin, cout, 3, 1, 1)``: same-size output, PyTorch init (fan_in = cout*9,
  which is also Keras' fan_in of the [3, 3, cout, cin] kernel)."""
  return keras.layers.Conv2DTranspose(cout, 3, strides=1, padding="same", use_bias=True,
                                      kernel_initializer=torch_layers.torch_default_kernel(),
                                      bias_initializer=_torch_uniform(cout * 9), name=name)


class Paraphraser(keras.layers.Layer):
  """Teacher-side autoencoder: [B, H, W, C] -> factor [B, H, W, int(rate*C)] -> [B, H, W, C]."""

  def __init__(self, channels, rate, **kwargs):
    super().__init__(**kwargs)
    m = int(channels * rate)
    self.enc0 = _conv3x3(channels, channels, "enc0")
    self.enc1 = _conv3x3(channels, m, "enc1")
    self.enc2 = _conv3x3(m, m, "enc2")
    self.dec0 = _deconv3x3(m, "dec0")
    self.dec1 = _deconv3x3(channels, "dec1")
    self.dec2 = _deconv3x3(channels, "dec2")

  def encode(self, x):
    for conv in (self.enc0, self.enc1, self.enc2):
      x = _leaky_relu(conv(x))
    return x

  def decode(self, factor):
    x = factor
    for conv in (self.dec0, self.dec1, self.dec2):
      x = _leaky_relu(conv(x))
    return x

  def call(self, x):
    """The reconstruction of ``x``."""
    return self.decode(self.encode(x))


class Translator(keras.layers.Layer):
  """Student-side encoder: [B, H, W, Cs] -> [B, H, W, m], three conv3x3 + BN + LeakyReLU(0.1)."""

  def __init__(self, channels, factor_channels, synchronized_bn=False, **kwargs):
    super().__init__(**kwargs)
    widths = (channels, factor_channels, factor_channels)
    cin = channels
    self._depth = len(widths)
    for i, cout in enumerate(widths):
      setattr(self, f"conv{i}", _conv3x3(cin, cout, f"conv{i}"))
      setattr(self, f"bn{i}", torch_layers.batch_norm(f"bn{i}", synchronized=synchronized_bn))
      cin = cout

  def call(self, x, training=None):
    for i in range(self._depth):
      x = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x), training=training)
      x = _leaky_relu(x)
    return x


def _resnet_or_wrn(arch):
  """RepDistiller's list of students whose paraphraser is trained at lr 0.01 (CIFAR ResNet, WRN)."""
  return arch.startswith("resnet") or arch.startswith("wrn_")


@register("FT")
class FT(Distiller):
  """{"ft": method_weight * factor_transfer(translator(f_s), paraphraser.encode(f_t), p)};
  stage ``paraphraser``: {"paraphraser": MSE(paraphraser(f_t), f_t)}."""
  method_weight = 200.0
  init_epochs = 30

  def __init__(self, student, teacher, *, rate=0.5, p=1.0, paraphraser_lr=None, **kwargs):
    super().__init__(student, teacher, **kwargs)
    if not is_number(rate) or not 0 < rate:
      raise UsageError(f"FT rate={rate!r}: must be a number > 0 (the factor has int(rate*C) "
                       "channels; the paper uses 0.5)")
    if not is_number(p) or p <= 0:
      raise UsageError(f"FT p={p!r}: must be a number > 0 (the paper uses 1)")
    if paraphraser_lr is not None and (not is_number(paraphraser_lr) or paraphraser_lr <= 0):
      raise UsageError(f"FT paraphraser_lr={paraphraser_lr!r}: must be a number > 0 or None")
    self.rate, self.p = float(rate), float(p)
    if paraphraser_lr is None and _resnet_or_wrn(_arch(student)):
      paraphraser_lr = 0.01
    self.paraphraser_lr = None if paraphraser_lr is None else float(paraphraser_lr)

  def build_connectors(self, s, t):
    ct, cs = int(t.features[-1].shape[-1]), int(s.features[-1].shape[-1])
    m = int(ct * self.rate)
    if m < 1:
      raise UsageError(f"FT cannot distil {_arch(self.student)} -> {_arch(self.teacher)} with "
                       f"rate={self.rate}: int({ct} * {self.rate}) = 0 factor channels")
    self.paraphraser = Paraphraser(ct, self.rate, name="paraphraser")
    self.translator = Translator(cs, m, self.synchronized_bn,
                                 name="translator")

  def terms(self, s, t, batch, *, training=True):
    factor_s = tf.cast(self.translator(s.features[-1], training=training), tf.float32)
    factor_t = tf.stop_gradient(tf.cast(self.paraphraser.encode(t.features[-1]), tf.float32))
    factor_s, factor_t = pool_to_match(factor_s, factor_t)
    diff = tf.abs(_attention_factor(factor_s) - _attention_factor(factor_t))
    loss = tf.reduce_mean(diff if self.p == 1.0 else tf.pow(diff, self.p))
    return {"ft": self.method_weight * loss}

  def reconstruction_terms(self, s, t, batch, *, training=True):
    """The paraphraser stage's term: MSE(paraphraser(f_t), f_t) (RepDistiller ``nn.MSELoss``)."""
    del s, batch, training
    target = t.features[-1]
    rec = tf.cast(self.paraphraser(target), tf.float32)
    return {"paraphraser": tf.reduce_mean(tf.square(rec - target))}

  def variables_to_train(self):
    """Main phase: student + translator (the paraphraser is frozen after its stage)."""
    return list(self.student.trainable_variables) + list(self.translator.trainable_variables)

  def stages(self):
    return [Stage("paraphraser", int(self.init_epochs), self.reconstruction_terms,
                  lambda: list(self.paraphraser.trainable_variables),
                  learning_rate=self.paraphraser_lr, uses_student=False)]

  def hparams(self):
    out = super().hparams()
    out.update(rate=self.rate, p=self.p)
    return out
