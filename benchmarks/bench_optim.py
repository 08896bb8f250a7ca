"""Time one optimiser update (apply_gradients only) of TorchSGD against Keras' SGD.

Usage: python benchmarks/bench_optim.py [--params 1000000] [--tensors 60] [--steps 200] [--jit]

The variables mimic a CIFAR ResNet's parameter list: `--tensors` tensors holding about `--params`
numbers in total. Gradients are fixed random tensors, so only the update is timed.
Prints one JSON line: milliseconds per update for each optimiser.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kd_tf2.optim import TorchSGD  # noqa: E402


def time_updates(make_optimizer, params, tensors, steps, jit):
    rng = np.random.default_rng(0)
    size = max(1, params // tensors)
    variables = [keras.Variable(rng.normal(size=(size,)).astype("float32")) for _ in range(tensors)]
    grads = [tf.constant(rng.normal(size=(size,)).astype("float32")) for _ in range(tensors)]
    optimizer = make_optimizer()
    optimizer.build(variables)

    @tf.function(jit_compile=jit)
    def update():
        optimizer.apply_gradients(zip(grads, variables))

    for _ in range(5):  # trace and warm up
        update()
    start = time.perf_counter()
    for _ in range(steps):
        update()
    _ = variables[0].numpy()
    return 1000.0 * (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--tensors", type=int, default=60)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--jit", action="store_true")
    args = parser.parse_args()
    candidates = {
        "TorchSGD": lambda: TorchSGD(learning_rate=0.05, momentum=0.9, weight_decay=5e-4),
        "keras.SGD": lambda: keras.optimizers.SGD(
            learning_rate=0.05, momentum=0.9, weight_decay=5e-4
        ),
    }
    result = {"params": args.params, "tensors": args.tensors, "jit": args.jit}
    for name, make in candidates.items():
        ms = time_updates(make, args.params, args.tensors, args.steps, args.jit)
        result[f"{name}_ms"] = round(ms, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
