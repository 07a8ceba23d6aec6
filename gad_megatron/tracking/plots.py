"""PNG plots of the curves that tell whether GAD is working, from the metric history."""

from __future__ import annotations

from pathlib import Path

# (file stem, title, metric keys, horizontal guide lines from the health thresholds)
PLOTS = (
    ("d_acc", "discriminator accuracy", ("d/d_acc",), ("d_acc_low", "d_acc_high")),
    ("reward", "reward (live D) and frozen-D reward", ("g/reward_mean", "g/frozen_d_reward"), ()),
    ("kl", "KL to the reference", ("g/kl",), ()),
    ("length", "response length: student vs teacher",
     ("g/response_len_mean", "g/teacher_len_mean"), ()),
    ("losses", "losses", ("d/d_loss", "g/sft_loss", "g/pg_loss"), ()),
    ("oracle", "D vs the task's acceptance test (reward.task)",
     ("d/oracle_auc", "task/accept_rate"), ()),
)


def write_plots(history: dict[str, list[tuple[int, float]]], out_dir: Path,
                guides: dict[str, float] | None = None) -> list[Path]:
    """One PNG per plot that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; must precede pyplot
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, keys, guide_names in PLOTS:
        present = [k for k in keys if history.get(k)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in present:
            steps, values = zip(*sorted(history[key]))
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)
        for name in guide_names:
            if guides and name in guides:
                ax.axhline(guides[name], color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
