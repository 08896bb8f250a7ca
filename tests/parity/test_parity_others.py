"""Step parity with mdistiller (DKD, ReviewKD, OFD), DIST_KD (DIST) and the KD-Zoo (IRG, AFD,
Sobolev, LwM, DML, BSS): three training steps of the reference's own distiller / loss objects and
training loop, replayed with our distillers from the same state on the same batches (fixtures:
tests/fixtures/parity/README.md "mdistiller, DIST_KD and KD-Zoo fixtures"; harness:
tests/parity/conftest.py; results: docs/parity/others.md)."""
import numpy as np
import pytest

from kd_tf2.distillers.afd import SEAttention  # noqa: F401  (the layer mapped below)


def _layers(parity, rows):
  """[(torch_key, variable, perm)] for [(torch module path, our Keras layer)]."""
  out = []
  for path, layer in rows:
    out.extend(parity.layer_entries(path, layer))
  return out


def reviewkd_connectors(parity):
  def rows(d):
    n = len(d.abfs)   # mdistiller keeps its ABFs deepest first: abfs.{n-1-i} is our abf_i
    pairs = []
    for i, abf in enumerate(d.abfs):
      j = n - 1 - i
      pairs += [(f"abfs.{j}.conv1.0", abf.conv1), (f"abfs.{j}.conv1.1", abf.bn1),
                (f"abfs.{j}.conv2.0", abf.conv2), (f"abfs.{j}.conv2.1", abf.bn2)]
      if abf.fuse:
        pairs.append((f"abfs.{j}.att_conv.0", abf.att_conv))
    return _layers(parity, pairs)
  return rows


def ofd_connectors(parity):
  def rows(d):
    pairs = []
    for i, c in enumerate(d.connectors):
      pairs += [(f"connectors.connectors.{i}.0", c.conv), (f"connectors.connectors.{i}.1", c.bn)]
    return _layers(parity, pairs)
  return rows


def afd_connectors(parity):
  def rows(d):
    pairs = []
    for i, a in enumerate(d.attentions):
      pairs += [(f"afd.{i}.attention.0", a.squeeze), (f"afd.{i}.attention.2", a.excite)]
    return _layers(parity, pairs)
  return rows


def dml_connectors(parity):
  def rows(d):   # the peer's weights are stored under c/peer.<state_dict key>
    return [("peer." + key, var, perm) for key, var, perm in parity.net_entries(d.peer)]
  return rows


def _replay(parity, name, connectors=None, **hparams):
  fx = parity.load_fixture(name)
  ours = parity.build(fx, connectors, **hparams)
  d = ours.distiller
  meta = fx["meta"]
  if "epoch" in meta:
    d.epoch.assign(float(meta["epoch"]))
  if "epochs" in meta:
    d.epochs = int(meta["epochs"])
  if hasattr(d, "refresh_margins"):   # OFD: margins from the teacher state loaded after create
    d.refresh_margins()
  terms, states = parity.run(fx, ours, d.train_step, d.variables_to_train())
  return fx, terms, states


def _assert(parity, fx, terms, states, what):
  parity.check(parity.compare(fx, terms, states, moving_stats=False), what=what)
  stats = parity.compare(fx, terms, states)
  stats = {k: v for k, v in stats.items() if parity.is_moving_stat(k)}
  if stats and not parity.bn_is_unbiased():
    pytest.xfail("BatchNorm moving_variance is updated with the biased batch variance "
                 "(issue 13 item 2, the w2-nets fix); weights and terms matched")
  parity.check(stats, what=what + " (moving statistics)")


# ---------------------------------------------------------------------------- mdistiller

def test_dkd(parity):
  fx, terms, states = _replay(parity, "dkd")
  _assert(parity, fx, terms, states, "DKD")


def test_reviewkd(parity):
  fx, terms, states = _replay(parity, "reviewkd", reviewkd_connectors(parity))
  _assert(parity, fx, terms, states, "ReviewKD")


def test_ofd(parity):
  """mdistiller's teacher runs with BatchNorm batch statistics (``OFD.train``): our default."""
  fx, terms, states = _replay(parity, "ofd", ofd_connectors(parity))
  _assert(parity, fx, terms, states, "OFD")


def test_ofd_moving_teacher_bn_is_not_the_reference(parity):
  """The documented option ``teacher_bn="moving"`` (inference-mode teacher) gives a different
  step: the fixture does tell the two modes apart."""
  fx, terms, _ = _replay(parity, "ofd", ofd_connectors(parity), teacher_bn="moving")
  assert parity.scaled_error(terms["ofd"], fx["terms/ofd"]) > 1e-2


# ------------------------------------------------------------------------------- DIST_KD

def _split_steps(fx, terms):
  """(fixture entries of step 1 with the first step's terms, our first-step terms)."""
  step1 = {k: v for k, v in fx.items() if not k.startswith(("step3/", "f64/", "ulp/"))}
  step1.update({k: v[:1] for k, v in fx.items() if k.startswith("terms/")})
  return step1, {k: v[:1] for k, v in terms.items()}


def test_dist_cifar_protocol(parity):
  """Step 1 (terms and weights) to 1e-4. Later steps: the student's logits saturate (CE 26 at
  step 3, softmax(z / 4) of order 1e-11 in most classes) and the reference itself is
  ill-conditioned there: scaling its input images by 1 +- 1e-7 moves its own step-3 weights by
  up to 3e-2 (``ulp/<key>`` in the fixture; the float64 run is no yardstick here because the
  float32 reference follows one of many nearby float32 trajectories). Every later entry must be
  within max(1e-4, that spread) of the reference."""
  fx, terms, states = _replay(parity, "dist")
  assert fx["meta"]["hparams"] == {"protocol": "cifar"}
  step1, terms1 = _split_steps(fx, terms)
  parity.check(parity.compare(step1, terms1, states), what="DIST step 1")
  errors = parity.compare(fx, terms, states)
  bad = {k: (v, float(fx["ulp/" + k])) for k, v in errors.items()
         if not v <= max(parity.TOL, float(fx["ulp/" + k]))}
  assert not bad, f"DIST: beyond the reference's own 1-ulp spread: {bad}"


# ---------------------------------------------------------------------------------- Zoo

def test_logits(parity):
  fx, terms, states = _replay(parity, "logits")
  _assert(parity, fx, terms, states, "Logits")


def test_irg(parity):
  fx, terms, states = _replay(parity, "irg")
  _assert(parity, fx, terms, states, "IRG")


def test_afd(parity):
  fx, terms, states = _replay(parity, "afd", afd_connectors(parity))
  _assert(parity, fx, terms, states, "AFD")


def test_sobolev(parity):
  fx, terms, states = _replay(parity, "sobolev")
  _assert(parity, fx, terms, states, "Sobolev")


LWM_OPEN = "step3/s/layer3.0.bn1.running_mean"


def test_lwm(parity):
  """Terms and weights to 1e-4 (worst 6e-5, step-3 layer2.0.downsample.1.bias). One moving mean
  after step 3 is 1.8e-4 off while the reference moves by 1e-7 when its input moves by 1 ulp:
  a small real difference of the second-order step not found yet (docs/parity/others.md)."""
  fx, terms, states = _replay(parity, "lwm")
  errors = parity.compare(fx, terms, states)
  parity.check({k: v for k, v in errors.items() if k != LWM_OPEN}, what="LwM")
  if not errors[LWM_OPEN] <= parity.TOL:
    pytest.xfail(f"LwM {LWM_OPEN}: {errors[LWM_OPEN]:.1e} (open, see docs/parity/others.md)")


def test_dml(parity):
  fx, terms, states = _replay(parity, "dml", dml_connectors(parity))
  _assert(parity, fx, terms, states, "DML")


def test_bss(parity):
  """Attack classes come from the fixture (the Zoo's seeded draws, batch key
  ``bss_attack_class``); every step attacks the top-2 of its 8 candidates.

  Asserted at step 1 (terms and weights, 1e-4). The attack's gates (a row moves only while the
  teacher still predicts its label; the loop stops when no row moves) make later steps
  discontinuous in the input: the reference's own float32 and float64 runs already differ by
  1.2e-3 after step 1 (where ours equals its float32 run to 1e-7) and by 6e-3 after step 3, and
  scaling its input by 1 +- 1e-7 moves its step-3 weights by up to 4e-3 (``ulp/<key>``): steps
  2-3 are reported in docs/parity/others.md, not asserted.
  """
  fx, terms, states = _replay(parity, "bss")
  assert min(fx["meta"]["candidates"]) > 2
  assert np.all(fx["terms/bss"] > 0)
  step1, terms1 = _split_steps(fx, terms)
  # Moving statistics too: every selected row is valid here, so our always-run adversarial pass
  # updates the student's BN exactly as the Zoo's does.
  parity.check(parity.compare(step1, terms1, states), what="BSS step 1")
