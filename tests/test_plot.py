"""The curves PNG: which logged keys each panel draws (per-source held-out accuracy included), and that it is
written."""
import json

from nanotorl.plot import panel_curves, plot_metrics


def test_accuracy_panel_draws_every_source_and_their_mean(tmp_path):
    records = [{"step": 0, "eval_accuracy": 0.2, "eval_accuracy/aime24": 0.1, "eval_accuracy/math500": 0.3,
                "eval_accuracy/average": 0.2, "eval_pass@1/aime24": 0.1, "eval_tool_fraction": 0.5},
               {"step": 1, "reward": -0.5, "tool_fraction": 0.4, "calls_ok_fraction": None},
               {"step": 2, "eval_accuracy": 0.4, "eval_accuracy/aime24": 0.2, "eval_accuracy/math500": 0.6,
                "eval_accuracy/average": 0.4, "reward": 0.5, "tool_fraction": 0.8, "calls_ok_fraction": 1.0}]
    curves = panel_curves(records)
    assert curves["held-out accuracy"] == {"eval_accuracy": [(0, 0.2), (2, 0.4)],
                                           "eval_accuracy/aime24": [(0, 0.1), (2, 0.2)],
                                           "eval_accuracy/math500": [(0, 0.3), (2, 0.6)],
                                           "eval_accuracy/average": [(0, 0.2), (2, 0.4)]}
    assert curves["tool use"] == {"tool_fraction": [(1, 0.4), (2, 0.8)], "eval_tool_fraction": [(0, 0.5)],
                                  "calls_ok_fraction": [(2, 1.0)]}
    assert "held-out accuracy" not in panel_curves(records[1:2])  # nothing validated: no empty panel
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_training_number_has_a_panel_with_whole_steps(tmp_path, monkeypatch):
    """Loss, gradient norm, entropy, clipping, log-prob gap and time: each logged key is drawn; with validation off
    there is no held-out panel, and a 3-step run has integer step ticks."""
    keys = ["loss", "grad_norm", "entropy", "clip_fraction", "logprob_gap_max", "time_train_s", "reward"]
    records = [{"step": s} | {k: 0.1 * s for k in keys} for s in (1, 2, 3)]
    curves = panel_curves(records)
    assert sorted(k for panel in curves.values() for k in panel) == sorted(keys)
    assert "held-out accuracy" not in curves
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from matplotlib.figure import Figure
    shown, real_savefig = [], Figure.savefig

    def savefig(fig, *args, **kwargs):
        shown.extend((ax.get_title(), [t for t in ax.get_xticks() if 1 <= t <= 3]) for ax in fig.axes
                     if ax.get_visible())
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert [title for title, _ in shown] == list(curves)
    assert all(ticks and all(float(t).is_integer() for t in ticks) for _, ticks in shown), shown
