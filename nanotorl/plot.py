"""The curves of a run, from its metrics.jsonl, as one PNG."""
import json
from pathlib import Path

PANELS = (("held-out accuracy", ["eval_accuracy"]), ("training reward", ["reward"]),
          ("tool use", ["tool_fraction", "eval_tool_fraction", "calls_ok_fraction"]),
          ("response length (tokens)", ["response_length"]))


def plot_metrics(jsonl, png) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (title, keys) in zip(axes, PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("eval") else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
