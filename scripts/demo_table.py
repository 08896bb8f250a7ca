"""Print the `make demo` table: teacher, student alone, student distilled (same data, same epochs).

    python scripts/demo_table.py TEACHER_DIR ALONE_DIR DISTILLED_DIR

Each argument is a train dir; the numbers are the test top-1 its results.json records.
"""
import json
import os
import sys


def row(label, train_dir):
  with open(os.path.join(train_dir, "results.json")) as f:
    r = json.load(f)
  return (f"| {label} | {r['arch'] if 'arch' in r else '?'} | {r['method']} | {r['epochs']} "
          f"| {r['top1']:.2f} | {r['best_top1']:.2f} |")


def main(argv):
  if len(argv) != 4:
    sys.exit(__doc__.strip())
  print("| run | net | method | epochs | test top-1 (%) last | best |")
  print("|---|---|---|---:|---:|---:|")
  for label, path in zip(("teacher", "student alone", "student distilled"), argv[1:]):
    print(row(label, path))


if __name__ == "__main__":
  main(sys.argv)
