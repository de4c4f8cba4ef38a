"""Validation accuracy against training minutes, one line per run, from the runs' history JSON files.

Each argument is HISTORY[=LABEL][@TEST_ACCURACY]: a finished run's test accuracy is drawn as one point at its end.
The README's "Accuracy by budget" figure comes from this script (docs/measurements.md has the command).

    python tools/plot_runs.py --out docs/budget.png runs/a/CNN.history.json=a@0.9962 runs/b/CNN.history.json=b
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402
import matplotlib.ticker  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import cli  # noqa: E402


def parse_run(text):
    """'HISTORY[=LABEL][@TEST]' -> (history path, label, test accuracy or None)."""
    match = re.fullmatch(r"(.+?)(?:=([^@]+))?(?:@([0-9.]+))?", text)
    path = Path(match[1])
    return path, match[2] or path.parent.name, float(match[3]) if match[3] else None


def main():
    parser = cli.Parser(__doc__)
    parser.add_argument("runs", nargs="+", help="HISTORY[=LABEL][@TEST_ACCURACY]")
    parser.add_argument("--out", default="runs.png")
    args = parser.parse_args()
    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for text in args.runs:
        path, label, test = parse_run(text)
        history = cli.read_json(path)
        minutes, elapsed = [], 0.0
        for record in history:
            elapsed += record["seconds"]
            minutes.append(elapsed / 60)
        line, = axes.plot(minutes, [100 * r["val_accuracy"] for r in history], marker=".", label=label)
        if test is not None:
            axes.plot([minutes[-1]], [100 * test], marker="*", markersize=12, color=line.get_color())
    axes.set_xscale("log")  # budgets from a minute to hours: each gets the same room
    axes.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda minutes, _: f"{minutes:g}"))
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_xlabel("training minutes (validation included; log scale)")
    axes.set_ylabel("accuracy, %")
    axes.set_title("validation accuracy per epoch (lines); test accuracy of each finished run (stars)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    with cli.atomic_path(args.out) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run_cli(main)
