"""``plait plan --plot``: memory and step-time breakdowns of the top layouts as one PNG (matplotlib)."""
from __future__ import annotations

from pathlib import Path

from .estimate import Estimate
from .explain import TERM_NAMES


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_breakdowns(estimates: list[Estimate], path: str | Path, title: str) -> Path:
    """Write stacked bars (memory per GPU by kind; step time by term) for `estimates` to `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("--plot needs matplotlib: pip install matplotlib (or pip install 'plait[plot]')") from exc
    labels = [e.layout.short().replace(" ", "\n", 3) for e in estimates]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(estimates)), 5))
    _stacked(ax_mem, labels, [e.memory.as_dict() for e in estimates], exclude={"total"}, names={})
    ax_mem.axhline(estimates[0].memory_capacity_gb, color="black", linestyle="--", linewidth=1, label="usable")
    ax_mem.set_ylabel("GB per GPU")
    ax_mem.set_title("memory")
    ax_mem.legend(fontsize=7)
    _stacked(ax_time, labels, [e.time for e in estimates], exclude=set(), names=TERM_NAMES)
    ax_time.set_ylabel("seconds per step" if estimates[0].mode == "train" else "seconds per request batch")
    ax_time.set_title("time")
    ax_time.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _stacked(ax, labels: list[str], parts: list[dict[str, float]], exclude: set[str], names: dict[str, str]) -> None:
    keys = [k for k in parts[0] if k not in exclude and any(p.get(k, 0) > 0 for p in parts)]
    bottoms = [0.0] * len(parts)
    for key in keys:
        values = [p.get(key, 0.0) for p in parts]
        ax.bar(labels, values, bottom=bottoms, label=names.get(key, key))
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.tick_params(axis="x", labelsize=7)
