"""Distil a student from a teacher (or train one net alone with --method=none).

    python train.py --method=AT --arch=resnet8x4 --teacher_arch=resnet32x4 --dataset=cifar100

Without --teacher_ckpt a --teacher_arch net is trained first into TRAIN_DIR/teacher (or reused).
Rerunning the same command resumes from the last checkpoint. Progress goes to the console and to
TensorBoard (``tensorboard --logdir runs``); the student is exported to TRAIN_DIR/student.keras and
TRAIN_DIR/saved_model. The last line printed is the results as JSON. Bad input: one line on stderr,
exit code 2. SIGTERM/Ctrl-C: a checkpoint is written and the process exits 0.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from kd_tf2 import cli  # noqa: E402
from kd_tf2.errors import TrainingDiverged, TrainingInterrupted  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("method", "ST", "Distillation method, case-insensitive: none, ST (KD), AT, "
                    "FitNet, ... (an unknown name prints the full list).")
flags.DEFINE_string("arch", "resnet8x4", "Student architecture: a nets name, or a .keras file "
                    "of any Keras classifier (trained or not; its weights are the start).")
flags.DEFINE_string("teacher_arch", None, "Teacher architecture (a nets name or a .keras file) "
                    "when the teacher is trained here (default resnet32x4); with --teacher_ckpt "
                    "the checkpoint's is used and this flag, if given, is checked against it.")
flags.DEFINE_string("teacher_ckpt", "", "Teacher: a train dir, a .keras file of any Keras "
                    "classifier, or reference weights (.npz, .pth; need --teacher_arch). Empty: "
                    "train a --teacher_arch teacher into TRAIN_DIR/teacher first (or reuse it).")
flags.DEFINE_string("teacher_features", "", "Comma-separated layer names of a .keras teacher "
                    "whose outputs are its feature maps (default: one per resolution).")
flags.DEFINE_string("student_features", "", "Comma-separated layer names of a .keras student "
                    "whose outputs are its feature maps (default: one per resolution).")
flags.DEFINE_string("peers", "", "Online methods (DML, KDCL): comma-separated nets trained "
                    "together with the student, e.g. resnet20,wrn_16_2; each exported as "
                    "TRAIN_DIR/peer<i>.keras.")
flags.DEFINE_string("assistants", "", "Teacher-assistant chain (TAKD): comma-separated nets "
                    "distilled in turn between the teacher and the student with --method, each in "
                    "TRAIN_DIR/assistant<k>_<arch>.")
flags.DEFINE_string("method_args", "", "The method's own keywords without a flag of their own, "
                    "KEY=VALUE[,KEY=VALUE...] (values: ints, floats, true/false, none, text), e.g. "
                    "--method=ONE --method_args=branches=4 or --method=KDCL "
                    "--method_args=ensemble=naive; an unknown key is refused with the accepted "
                    "ones.")
flags.DEFINE_string("dataset", "cifar100", "cifar10, cifar100, any tfds image-classification "
                    "name, folder:PATH, cifar10_mini (embedded, offline) or synthetic.")
flags.DEFINE_string("data_dir", "", "tfds data directory (default: tfds' own).")
flags.DEFINE_float("fraction", 1.0, "Class-balanced fraction of the training set, in (0, 1].")
flags.DEFINE_integer("image_size", None, "Train and evaluate on S x S images (default: the "
                     "native size; required for folders of mixed sizes).")
flags.DEFINE_string("augment", "auto", "auto | imagenet | cifar | none: the training augmentation "
                    "(auto: imagenet - RandomResizedCrop + flip, evaluation resize + centre crop - "
                    "for images of 64 px and more, else cifar - pad 4, crop, flip).")
flags.DEFINE_string("cache", "auto", "auto | memory | none: keep the decoded images in memory, or "
                    "decode them as streamed (auto: memory for small CIFAR-style data).")
flags.DEFINE_integer("seed", 0, "Seed of the subset, shuffling, augmentation and initialisation.")
flags.DEFINE_string("protocol", "auto", "auto | cifar | imagenet: the defaults of the schedule "
                    "(cifar: 240 epochs, batch 64, wd 5e-4, lr x0.1 at 62.5/75/87.5%; imagenet: "
                    "100 epochs, batch 256, lr 0.1, wd 1e-4, x0.1 at 30/60/90%); auto = imagenet "
                    "for imagenet* datasets, else cifar.")
flags.DEFINE_integer("epochs", None, "Epochs of the main phase (default: the protocol's).")
flags.DEFINE_integer("teacher_epochs", None, "Epochs of the teacher when it is trained here "
                     "(default: --epochs).")
flags.DEFINE_integer("init_epochs", None, "Epochs of the method's init stage (FitNet hint, AB, "
                     "FSP, FT, MHGD; default: the method's).")
flags.DEFINE_integer("batch_size", None, "Global batch size, divisible by the replicas "
                     "(default: the protocol's, 64 or 256).")
flags.DEFINE_float("lr", None, "Base learning rate (default: imagenet 0.1; cifar 0.05, 0.01 for "
                   "MobileNetV2 and ShuffleNet students).")
flags.DEFINE_float("weight_decay", None, "Coupled (PyTorch-style) weight decay (default: the "
                   "protocol's, 5e-4 or 1e-4).")
flags.DEFINE_float("ce_weight", None, "Weight of the cross-entropy (RepDistiller -r; default: "
                   "the method's).")
flags.DEFINE_float("kd_weight", None, "Weight of the soft-target KD term (-a; default: the "
                   "method's).")
flags.DEFINE_float("method_weight", None, "Weight of the method's own loss (-b; default: the "
                   "method's).")
flags.DEFINE_float("temperature", None, "Temperature of the KD term (default 4).")
flags.DEFINE_string("train_dir", "", "Where checkpoints, TensorBoard events and exports go "
                    "(default runs/<dataset>/<method>_<teacher>_<student>_seed<seed>).")
flags.DEFINE_string("strategy", "auto", "auto | one_device | mirrored | multi_worker | tpu.")
flags.DEFINE_integer("cpu_replicas", 1, "Split the CPU into N logical devices (test "
                     "distribution without GPUs).")
flags.DEFINE_float("cluster_timeout", 300.0, "--strategy=multi_worker: seconds to wait for the "
                   "other tasks of TF_CONFIG to accept connections before giving up.")
flags.DEFINE_boolean("jit_compile", False, "Compile the per-replica step with XLA (slower than "
                     "oneDNN on CPU).")
flags.DEFINE_boolean("mixed_precision", False, "mixed_float16 on GPU (loss scaling), "
                     "mixed_bfloat16 on CPU/TPU.")
flags.DEFINE_integer("log_every_n_steps", None, "Train scalars to TensorBoard and a console line "
                     "every N steps within an epoch (0: per epoch only; default: 1/20 of an epoch "
                     "for epochs of 500+ steps, else 0).")
flags.DEFINE_integer("checkpoint_every_n_steps", 0, "Also checkpoint every N steps within an "
                     "epoch (0: at the end of each epoch only); a rerun resumes at that step.")
flags.DEFINE_float("checkpoint_every_minutes", 0.0, "Also checkpoint when this many minutes have "
                   "passed since the last checkpoint (0: off; not with multi_worker).")

_FIELDS = ("method", "arch", "teacher_arch", "teacher_ckpt", "teacher_features",
           "student_features", "peers", "assistants", "method_args", "dataset", "data_dir",
           "fraction", "image_size", "augment", "cache", "seed", "protocol", "epochs",
           "teacher_epochs", "init_epochs", "batch_size", "lr", "weight_decay",
           "ce_weight", "kd_weight", "method_weight", "temperature", "train_dir", "strategy",
           "cpu_replicas", "cluster_timeout", "jit_compile", "mixed_precision",
           "log_every_n_steps", "checkpoint_every_n_steps", "checkpoint_every_minutes")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --help)")
  values = {name: FLAGS[name].value for name in _FIELDS}
  cli.run_guarded(cli.start_tensorflow, values["cpu_replicas"], values["strategy"],
                  values["cluster_timeout"])
  from kd_tf2 import engine  # pylint: disable=import-outside-toplevel
  try:
    results = cli.run_guarded(engine.train, engine.TrainConfig(**values), flags=values)
  except TrainingInterrupted as e:
    print(f"train.py: {e}", file=sys.stderr, flush=True)
    sys.exit(0)
  except TrainingDiverged as e:
    cli.fail(e, code=1)
  print(json.dumps(results, sort_keys=True), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(FLAGS))
