"""Paired speed of the zoo nets vs kd_tf2.adapt of functional copies of them, in ONE process,
steps interleaved (zoo, adapted, zoo, ...): the ratio is immune to the load drifting between
separate runs. Uses kd_tf2.bench.speed's own helpers (the engine's compile_step).
usage: python benchmarks/bench_adapter_paired.py ARCH TEACHER METHOD STEPS
(e.g. resnet8 resnet20 ST 20); prints one JSON line with the medians and paired ratios."""
import dataclasses, json, os, statistics, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras
from kd_tf2.bench import speed

arch, teacher, method, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = speed.validate(speed.SpeedConfig(arch=arch, teacher_arch=teacher, batch_size=64,
                                        num_classes=100))
keras.utils.set_random_seed(0)
batch = speed._random_batch(base)
runs = {}
for kind, adapt in (("zoo", False), ("adapted", True)):
  cfg = dataclasses.replace(base, adapt=adapt)
  runs[kind] = speed._method_step(method, speed._Nets(cfg), cfg, False)
  for _ in range(3):
    speed._run(runs[kind], batch)
wall = {k: [] for k in runs}; cpu = {k: [] for k in runs}
for _ in range(steps):
  for k, step in runs.items():
    w, c = speed._run(step, batch)
    wall[k].append(w); cpu[k].append(c)
ratio = statistics.median(a / z for a, z in zip(wall["adapted"], wall["zoo"]))
cpu_ratio = statistics.median(a / z for a, z in zip(cpu["adapted"], cpu["zoo"]))
print(json.dumps({"arch": arch, "teacher": teacher, "method": method, "steps": steps,
                  "zoo_ms": 1000 * statistics.median(wall["zoo"]),
                  "adapted_ms": 1000 * statistics.median(wall["adapted"]),
                  "ratio_wall": ratio, "ratio_cpu": cpu_ratio}))
