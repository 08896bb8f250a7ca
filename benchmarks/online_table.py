"""Print the short-schedule table of the online and self-distillation runs.

    python benchmarks/online_table.py OUT_DIR

OUT_DIR is the one given to ``benchmarks/online_short_run.sh``; each ``NAME.log`` ends with the
run's results (the JSON line ``train.py`` prints). One row per run: the exported student's test
top-1, every other net's (branches, heads, peers, chain links) and the ensemble's, and the
student's gain over the same net trained alone (the ``none_<arch>`` run).
"""
import json
import os
import sys

_EXTRA = ("branch", "head", "peer", "teacher", "assistant", "ensemble")


def results(out_dir, name):
  """The results dict ``NAME.log`` ends with, or None when the run has not finished."""
  path = os.path.join(out_dir, f"{name}.log")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    lines = [line for line in f.read().splitlines() if line.startswith("{")]
  return json.loads(lines[-1]) if lines else None


def others(r):
  """``"branch1 55.1, ensemble 57.2"``: the top-1 of every net but the exported student."""
  keys = sorted(k for k in r if k.endswith("_top1") and k.startswith(_EXTRA) and k != "best_top1")
  return ", ".join(f"{k[:-5]} {r[k]:.2f}" for k in keys) or "—"


def main(argv):
  if len(argv) != 2:
    sys.exit(__doc__.strip())
  out_dir = argv[1]
  names = sorted(f[:-4] for f in os.listdir(out_dir) if f.endswith(".log"))
  runs = {n: r for n in names if (r := results(out_dir, n))}
  print("| run | method | student | student top-1 (%) | alone (%) | Δ | other nets' top-1 (%) "
        "| train img/s |")
  print("|---|---|---|---:|---:|---:|---|---:|")
  for name, r in runs.items():
    alone = runs.get(f"none_{r['arch']}")
    base = f"{alone['top1']:.2f}" if alone else "—"
    gain = f"{r['top1'] - alone['top1']:+.2f}" if alone and r["method"] != "none" else ""
    print(f"| {name} | {r['method']} | {r['arch']} | {r['top1']:.2f} | {base} | {gain} "
          f"| {others(r)} | {r['images_per_sec']:.0f} |")


if __name__ == "__main__":
  main(sys.argv)
