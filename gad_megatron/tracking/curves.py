"""PNG plots of the curves that tell whether GAD is healthy."""

from __future__ import annotations

from pathlib import Path

CURVES = {
    "d_acc": ("discriminator accuracy", ["d/d_acc"]),
    "reward": ("reward of G's samples", ["g/reward_mean", "g/frozen_d_reward"]),
    "kl": ("KL to the reference", ["g/kl"]),
    "length": ("response length (tokens)", ["g/response_len_mean", "g/teacher_len_mean"]),
}


def write_curve_plots(history: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per curve group with data (history: per-step metric dicts with 'step')."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    for name, (title, keys) in CURVES.items():
        series = {k: [(h["step"], h[k]) for h in history if k in h] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
