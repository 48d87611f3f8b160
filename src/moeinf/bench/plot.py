"""`moeinf bench --plot FILE.png`: per-token decode latency over the generation, one line per policy.

matplotlib is an optional extra: without it, a MissingDependency error says how to install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeinf.errors import MissingDependency


def write_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Draw `result["latency_curves"]` (median ms per decode step) into a PNG at `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependency(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for policy, curve in result["latency_curves"].items():
        ax.plot(range(1, len(curve) + 1), curve, label=policy, linewidth=1.2)
    limit = result["limit"].get("ms_per_token")
    if limit:
        ax.axhline(limit, color="black", linestyle="--", linewidth=0.8, label="physical limit")
    ax.set_xlabel("decode step")
    ax.set_ylabel("latency per token (ms, median over prompts and repeats)")
    ax.set_yscale("log")
    ax.set_title(f"moeinf bench {result['model']}: RAM {result['config'].get('ram_mem') or 'default'}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
