"""kd_tf2.Distillation: any method through Keras compile()/fit() (issue 11 item 3)."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kd_tf2
from kd_tf2 import optim
from kd_tf2.engine.loop import Trainer
from support import convnet  # noqa: E402


def data(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, 16, 16, 3)).astype(np.float32), rng.integers(0, 10, n)


def pair(seed=0):
  keras.utils.set_random_seed(seed)
  return convnet([8, 16, 32], name="teacher", size=16), convnet([4, 8], name="student", size=16)


def test_st_through_fit_equals_the_engine_step_and_keras_distillation():
  """Three steps of ST (batch 4, no shuffling, the reference SGD at lr 0.05): the student's
  weights after fit equal those after the engine's compiled step on the same batches, and those
  after keras.distillation.Distiller with LogitsDistillation(KLDivergence()) and student weight
  0.1 (ST = 0.1 CE + 0.9 T^2 KL at T = 4)."""
  x, y = data(12)

  teacher, student = pair()
  d = kd_tf2.Distillation("ST", student, teacher)
  d.compile()
  d.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
  ours = [v.numpy() for v in student.trainable_variables]

  teacher, student = pair()
  distiller = kd_tf2.distillers.create("ST", kd_tf2.adapt(student), kd_tf2.adapt(teacher),
                                       input_shape=(16, 16, 3))
  trainer = Trainer(strategy=tf.distribute.get_strategy(), student=distiller.student,
                    distiller=distiller, train_data=None, test_data=None, steps_per_epoch=3,
                    global_batch=4, epochs=1, base_lr=0.05)
  step = trainer.distributed_step("main")
  for i in range(3):
    step({"image": tf.constant(x[4 * i:4 * i + 4]), "label": tf.constant(y[4 * i:4 * i + 4]),
          "index": tf.range(4 * i, 4 * i + 4)})
  engine = [v.numpy() for v in student.trainable_variables]

  teacher, student = pair()
  k = keras.distillation.Distiller(
      teacher=teacher, student=student, student_loss_weight=0.1,
      distillation_losses=keras.distillation.LogitsDistillation(
          temperature=4.0, loss=keras.losses.KLDivergence()))
  k.compile(optimizer=optim.TorchSGD(0.05, momentum=0.9, weight_decay=5e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  k.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
  theirs = [v.numpy() for v in student.trainable_variables]

  initial = [v.numpy() for v in pair()[1].trainable_variables]
  moved = [not np.allclose(a, b) for a, b in zip(ours, initial)]
  assert any(moved)
  for a, b, c in zip(ours, engine, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def test_fit_logs_every_term_takes_every_data_form_and_callbacks_work(tmp_path):
  x, y = data(16)
  teacher, student = pair()
  d = kd_tf2.Distillation("AT", student, teacher)
  d.compile()
  assert isinstance(d.optimizer, optim.TorchSGD)
  assert float(d.optimizer.learning_rate) == pytest.approx(0.05)
  ckpt = str(tmp_path / "ckpt.weights.h5")
  callbacks = [keras.callbacks.ModelCheckpoint(ckpt, monitor="val_accuracy",
                                               save_weights_only=True, save_best_only=True),
               keras.callbacks.EarlyStopping("val_accuracy", patience=1),
               keras.callbacks.TensorBoard(str(tmp_path / "tb"))]
  history = d.fit(x, y, batch_size=4, epochs=8, validation_data=(x, y), verbose=0,
                  callbacks=callbacks)
  h = history.history
  assert {"ce", "at", "loss", "accuracy", "val_loss", "val_accuracy"} <= set(h)
  epochs = len(h["loss"])
  assert 2 <= epochs < 8  # EarlyStopping (patience 1) stopped the run
  np.testing.assert_allclose(np.array(h["ce"]) + np.array(h["at"]), h["loss"], rtol=1e-5)
  assert os.path.isfile(ckpt) and os.listdir(tmp_path / "tb")
  # tf.data of (x, y) and of our dict batches, and (dict x, y)
  ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
  assert len(d.fit(ds, epochs=1, verbose=0).history["at"]) == 1
  dicts = tf.data.Dataset.from_tensor_slices({"image": x, "label": y,
                                              "index": np.arange(16)}).batch(4)
  assert len(d.fit(dicts, epochs=1, verbose=0).history["at"]) == 1
  assert len(d.fit({"image": x}, y, batch_size=4, verbose=0).history["at"]) == 1
  # the student is the trained Keras model
  assert d.student.source is student
  np.testing.assert_allclose(d.predict(x, verbose=0), d.student(x), atol=1e-5)
  result = d.evaluate(x, y, verbose=0, return_dict=True)
  assert set(result) == {"loss", "accuracy"}


def test_staged_method_runs_its_stage_epochs_first_then_the_main_phase():
  x, y = data(8)
  teacher, student = pair()
  d = kd_tf2.Distillation("FitNet", student, teacher, init_epochs=2, hint_layer=1)
  d.compile()
  h = d.fit(x, y, batch_size=4, epochs=3, verbose=0).history
  assert len(h["hint/hint"]) == 2 and len(h["hint"]) == 1 and len(h["ce"]) == 1
  assert d.distiller.epochs == 1
  with pytest.raises(kd_tf2.UsageError, match=r"runs 2 stage epoch\(s\) first"):
    d.fit(x, y, batch_size=4, epochs=2, verbose=0)


def test_crd_reads_indices_from_a_dict_x():
  x, y = data(16)
  teacher, student = pair()
  d = kd_tf2.Distillation("CRD", student, teacher, train_labels=y, nce_k=8)
  d.compile()
  h = d.fit({"image": x, "index": np.arange(16)}, y, batch_size=4, epochs=1, verbose=0).history
  assert np.isfinite(h["crd"][0])


def test_bad_compile_arguments_are_refused():
  teacher, student = pair()
  d = kd_tf2.Distillation("ST", student, teacher)
  with pytest.raises(kd_tf2.UsageError, match="does not take loss="):
    d.compile(loss="mse")
  with pytest.raises(kd_tf2.UsageError, match="unknown method"):
    kd_tf2.Distillation("nope", student, teacher)
