"""The engine: tf.distribute training of a student with a distiller (DESIGN.md contract 5).

    from kd_tf2 import engine
    results = engine.train(engine.TrainConfig(method="AT", arch="resnet8", teacher_arch="resnet20",
                                              dataset="cifar10_mini", epochs=30, train_dir="runs/at"))
    engine.evaluate("runs/at", "cifar10_mini")     # {"top1", "top5", "loss", "n"}

Modules, one idea each: ``config`` (the settings of a run and their validation), ``strategy``
(which ``tf.distribute`` strategy), ``rundir`` (the train dir: flags, checkpoints, results),
``models`` (building, loading, exporting nets), ``step`` (the one compiled training step, used by
the loop and the speed benchmark), ``loop`` (phases, epochs, evaluation, checkpoints, signals),
``summaries`` (TensorBoard and console), ``run`` (the whole command).
"""
from kd_tf2.engine.config import TrainConfig
from kd_tf2.engine.loop import Evaluator, Trainer, make_optimizer
from kd_tf2.engine.models import build_net, load_model, load_teacher
from kd_tf2.engine.run import evaluate, train
from kd_tf2.engine.strategy import STRATEGIES, configure_cpu_replicas, make_strategy

__all__ = ["TrainConfig", "Trainer", "Evaluator", "make_optimizer", "build_net", "load_model",
           "load_teacher", "train", "evaluate", "STRATEGIES", "configure_cpu_replicas",
           "make_strategy"]
