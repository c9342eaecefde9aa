"""Draw the curves of one or more runs from their metrics.jsonl files into a PNG.

    python plot.py ckpts/Qwen2.5-7B/grpo/metrics.jsonl                       # eval accuracy and reward
    python plot.py GRPO=run1/metrics.jsonl "lr 0=run2/metrics.jsonl" --metrics eval_accuracy --out curve.png

Each argument is a metrics.jsonl file written by grpo.py, optionally labelled LABEL=PATH. One panel
per metric, one line per run, the training step on the x axis (step 0 is the evaluation before
the first update). Needs matplotlib (pip install matplotlib), which nothing else here does.
"""
import argparse
import json
import os
import sys

from prepare import die, one_line_errors


def read_runs(specs):
    """[(label, [metrics dict per step])] from LABEL=PATH or PATH arguments; a torn last line (a run
    killed mid-write) is skipped."""
    runs = []
    for spec in specs:
        label, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (None, spec)
        if not os.path.isfile(path):
            die(f"{path} not found (a metrics.jsonl written by grpo.py)")
        rows = []
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
        runs.append((label or os.path.basename(os.path.dirname(os.path.abspath(path))), rows))
    return runs


def curve(rows, metric):
    """(steps, values) of the rows that carry `metric`."""
    points = [(r["step"], r[metric]) for r in rows if isinstance(r.get(metric), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def main(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description="Plot grpo.py's metrics.jsonl files into a PNG."))
    p.add_argument("runs", nargs="+", help="metrics.jsonl files, each optionally LABEL=PATH")
    p.add_argument("--metrics", nargs="+", default=["eval_accuracy", "reward"], help="metrics to draw, one panel each")
    p.add_argument("--out", default="curve.png", help="PNG to write")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    runs = read_runs(a.runs)
    missing = [m for m in a.metrics if not any(curve(rows, m)[0] for _, rows in runs)]
    if missing:
        die(f"no run logged {', '.join(missing)}; metrics.jsonl has e.g. reward, eval_accuracy, kl, entropy")
    try:
        import matplotlib
        matplotlib.use("Agg")                      # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        die("plot.py needs matplotlib: pip install matplotlib")
    fig, axes = plt.subplots(1, len(a.metrics), figsize=(4.5 * len(a.metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], a.metrics):
        for label, rows in runs:
            x, y = curve(rows, metric)
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    tmp = a.out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
