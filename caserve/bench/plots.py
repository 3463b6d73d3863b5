"""PNG plots of bench results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

logger = logging.getLogger(__name__)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path


def jct_cdf(jcts: Mapping[str, Sequence[float]], path: Path, *, title: str = "JCT CDF") -> Path:
    """One empirical CDF of JCT (seconds) per configuration label."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in jcts.items():
        v = np.sort(np.asarray(values, dtype=float))
        if len(v):
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=f"{label} (n={len(v)})")
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def queue_delay_over_time(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, *, title: str = "Queue delay over time") -> Path:
    """Per configuration: (arrival offset s, queue delay s) points, as lines in arrival order."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (t, q) in series.items():
        t, q = np.asarray(t, dtype=float), np.asarray(q, dtype=float)
        order = np.argsort(t)
        ax.plot(t[order], q[order], marker=".", markersize=3, linewidth=1, label=label)
    ax.set_xlabel("arrival time since start (s)")
    ax.set_ylabel("queue delay (s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def reduction_heatmap(rows: Sequence[str], cols: Sequence[str], values: np.ndarray, path: Path, *, title: str) -> Path:
    """Matrix of reductions in % (shape (len(rows), len(cols)); NaN = not run)."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.2 + 0.45 * len(rows)))
    im = ax.imshow(values, cmap="RdYlGn", vmin=-100, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.0f}%", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="reduction (%)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def projection(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, *, ylabel: str, title: str) -> Path:
    """Simulator sweep: y (e.g. mean JCT) against CPU nodes, one curve per label (symlog x axis)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker="o", label=label)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("CPU nodes (assisted workers)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
