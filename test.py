"""Evaluate a trained model: a human summary, then one JSON line {"top1", "top5", "loss", "n"}.

    python test.py --model=runs/cifar100/AT_resnet32x4_resnet8x4_seed0 [--dataset=cifar100]
    python test.py --model=student.keras --dataset=cifar100 --split=test

--model is a train dir (its exported student.keras) or a .keras file. For a train dir, --dataset
defaults to the one it was trained on. Accuracies are percentages, loss the mean cross-entropy.
Bad input: one line on stderr, exit code 2.
"""
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from kd_tf2 import cli  # noqa: E402
from kd_tf2.errors import UsageError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "", "A train dir or a .keras file.")
flags.DEFINE_string("dataset", "", "Dataset name (default for a train dir: its own).")
flags.DEFINE_string("split", "test", "Split to evaluate.")
flags.DEFINE_string("data_dir", "", "tfds data directory (default: tfds' own).")
flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.")


def trained_dataset(path):
  """The --dataset a train dir was made with, or None."""
  from kd_tf2.engine import rundir  # pylint: disable=import-outside-toplevel
  from kd_tf2.errors import UsageError  # pylint: disable=import-outside-toplevel
  try:
    return (rundir.RunDir(path).settings() or {}).get("dataset")
  except UsageError:
    return None


def evaluate():
  """(model, dataset, result) of the flags; raises on bad input."""
  from kd_tf2 import engine  # pylint: disable=import-outside-toplevel
  if not FLAGS.model:
    raise UsageError("--model is required: a train dir or a .keras file")
  if FLAGS.batch_size < 1:
    raise UsageError(f"--batch_size={FLAGS.batch_size}: must be an integer >= 1")
  model = engine.load_model(FLAGS.model)
  dataset = FLAGS.dataset or (os.path.isdir(FLAGS.model) and trained_dataset(FLAGS.model))
  if not dataset:
    raise UsageError("--dataset is required (the model is not a train dir that records it)")
  result = engine.evaluate(model, dataset, FLAGS.split, data_dir=FLAGS.data_dir,
                           batch_size=FLAGS.batch_size)
  return model, dataset, result


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; use --model=... --dataset=...")
  cli.start_tensorflow()
  model, dataset, result = cli.run_guarded(evaluate)
  arch = getattr(model, "arch", model.name)
  print(f"{arch} ({FLAGS.model}) on {dataset} [{FLAGS.split}], {result['n']} images: "
        f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}")
  print(json.dumps({k: result[k] for k in ("top1", "top5", "loss", "n")}), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(FLAGS))
