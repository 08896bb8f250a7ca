"""Merge kd_tf2's speed rows with the PyTorch reference's into one markdown table.

Usage: python benchmarks/compare_torch.py OURS.json TORCH.json [--title TEXT]

OURS.json is written by ``python -m kd_tf2.bench speed --json=...``, TORCH.json by
``benchmarks/bench_torch_reference.py --json=...``: both are JSON lists of rows with ``method``,
``status``, ``ms_per_step`` and ``ratio_to_student``. Rows are matched by method name
(case-insensitive); a method measured on one side only, or not ``ok`` there, shows "—".
speed-up = PyTorch ms/step / kd_tf2 ms/step: above 1, kd_tf2's step is faster. Needs only the
standard library (no TensorFlow, no torch).
"""

import argparse
import json
import sys


def load_rows(path):
    """``{method name lower-cased: row}`` from a speed JSON list; ValueError on a bad file."""
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "method" in r for r in rows):
        raise ValueError(f"{path}: expected a JSON list of rows with a 'method' key")
    return {str(r["method"]).lower(): r for r in rows}


def _ms(row):
    """The row's ms/step, or None when the row is missing or did not run."""
    if row is None or row.get("status", "ok") != "ok":
        return None
    return row.get("ms_per_step")


def merge(ours, torch_rows):
    """Joined rows ``{method, ours_ms, torch_ms, speedup, ours_x_student, torch_x_student}`` in
    the order of ``ours``, then the methods only the torch side has."""
    keys = list(ours) + [k for k in torch_rows if k not in ours]
    merged = []
    for key in keys:
        a, b = ours.get(key), torch_rows.get(key)
        ours_ms, torch_ms = _ms(a), _ms(b)
        merged.append({
            "method": (a or b)["method"],
            "ours_ms": ours_ms, "torch_ms": torch_ms,
            "speedup": torch_ms / ours_ms if ours_ms and torch_ms else None,
            "ours_x_student": a.get("ratio_to_student") if ours_ms else None,
            "torch_x_student": b.get("ratio_to_student") if torch_ms else None,
        })
    return merged


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def markdown(merged, title=""):
    lines = [title, ""] if title else []
    lines += ["| method | kd_tf2 ms/step | PyTorch ms/step | speed-up | kd_tf2 × student | "
              "PyTorch × student |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in merged:
        flag = " (slower)" if r["speedup"] is not None and r["speedup"] < 1 else ""
        lines.append(f"| {r['method']} | {_fmt(r['ours_ms'], '.1f')} | "
                     f"{_fmt(r['torch_ms'], '.1f')} | {_fmt(r['speedup'], '.2f')}{flag} | "
                     f"{_fmt(r['ours_x_student'], '.2f')} | {_fmt(r['torch_x_student'], '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ours", help="kd_tf2 speed JSON")
    p.add_argument("torch", help="bench_torch_reference.py JSON")
    p.add_argument("--title", default="", help="a line printed above the table")
    args = p.parse_args(argv)
    try:
        ours, torch_rows = load_rows(args.ours), load_rows(args.torch)
    except (OSError, ValueError) as e:
        print(f"compare_torch.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown(merge(ours, torch_rows), args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
