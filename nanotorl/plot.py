"""The curves of a run, from its metrics.jsonl, as one PNG.

A panel's key ending in "/*" stands for every logged key under it, in the order they first appear: the held-out
accuracy of each source ("eval_accuracy/aime24") and their unweighted mean ("eval_accuracy/average") when the
validation set has several sources (train.evaluate). A panel none of whose keys was logged (held-out accuracy
with validation off) is left out, and the step axis has whole steps only.
"""
import json
from pathlib import Path

PANELS = (("held-out accuracy", ["eval_accuracy", "eval_accuracy/*"]), ("training reward", ["reward"]),
          ("tool use", ["tool_fraction", "eval_tool_fraction", "calls_ok_fraction"]),
          ("response length (tokens)", ["response_length"]), ("loss", ["loss"]), ("gradient norm", ["grad_norm"]),
          ("entropy (nats)", ["entropy"]), ("clipped tokens", ["clip_fraction", "dual_clip_fraction"]),
          ("log-prob gap, generator - trainer", ["logprob_gap_mean", "logprob_gap_max"]),
          ("time per step (s)", ["time_generate_s", "time_sandbox_wait_s", "time_train_s"]))
COLUMNS = 5  # panels per row of the figure


def panel_curves(records: list[dict]) -> dict[str, dict[str, list[tuple]]]:
    """{panel title: {key: [(step, value), ...]}} for every key of :data:`PANELS` that was logged."""
    logged = list(dict.fromkeys(key for r in records for key in r))
    curves = {}
    for title, keys in PANELS:
        expanded = [k for key in keys for k in
                    ([k for k in logged if k.startswith(key[:-1])] if key.endswith("/*") else [key])]
        points = {key: [(r["step"], r[key]) for r in records if r.get(key) is not None] for key in expanded}
        if drawn := {key: p for key, p in points.items() if p}:
            curves[title] = drawn
    return curves


def plot_metrics(jsonl, png) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    panels = panel_curves(records)
    rows, cols = -(-len(panels) // COLUMNS) or 1, min(len(panels), COLUMNS) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, curves) in zip(axes.flat, panels.items()):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for key, points in curves.items():
            ax.plot(*zip(*points), marker="o" if key.startswith("eval") else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return Path(png)
