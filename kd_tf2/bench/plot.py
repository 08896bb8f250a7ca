"""``results.png`` of ``kd_tf2.bench table``: test top-1 against the training-set fraction.

One line per method (mean last-epoch top-1 over seeds, with the seeds' standard deviation as error
bars), and the teacher and the student trained alone as dashed reference lines: the seed
benchmark's headline result, drawn. Reads the ``summary()`` dict the table writes as results.json.
"""
import os

TEACHER, STUDENT = "teacher", "none"


def _series(row, fractions):
  """(fractions, means, stds) of the cells of ``row`` that hold a result."""
  xs, means, stds = [], [], []
  for fraction in fractions:
    final = row["cells"][f"{fraction:g}"]["final"]
    if final is not None:
      xs.append(fraction)
      means.append(final["mean"])
      stds.append(final["std"])
  return xs, means, stds


def plot_fractions(summary, path):
  """Draw ``summary`` (``Sweep.summary()``) into the PNG file ``path``; returns ``path``, or None
  when no cell holds a result yet."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")  # files only, no display
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  fractions = sorted(summary["fractions"])
  rows = [(row, _series(row, fractions)) for row in summary["rows"]]
  if not any(xs for _, (xs, _, _) in rows):
    return None
  fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
  for row, (xs, means, stds) in rows:
    if not xs:
      continue
    reference = row["row"] in (TEACHER, STUDENT)
    ax.errorbar([100.0 * x for x in xs], means, yerr=stds if any(stds) else None,
                label=row["label"], marker="o", markersize=4, capsize=3,
                linestyle="--" if reference else "-", linewidth=2.0 if reference else 1.3,
                color="black" if row["row"] == TEACHER else "gray" if reference else None)
  ax.set_xscale("log")
  ticks = [100.0 * f for f in fractions]
  ax.set_xticks(ticks)
  ax.set_xticklabels([f"{t:g}%" for t in ticks])
  ax.minorticks_off()
  ax.set_xlabel("training-set fraction (class-balanced)")
  ax.set_ylabel("test top-1 (%)")
  ax.set_title(f"{summary['teacher_arch']} -> {summary['arch']} on "
               f"{os.path.basename(str(summary['dataset']).rstrip('/'))}, {summary['epochs']} "
               f"epochs", fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
