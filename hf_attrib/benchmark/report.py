"""Results tables and charts of a benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["results_chart", "results_markdown", "settings_text"]


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _metric(row: dict[str, Any], metric: str) -> str:
    """``0.812 [0.790, 0.833]``: the value and its bootstrap interval, where there is one."""
    text = _fmt(row.get(metric))
    interval = row.get(f"{metric}_ci")
    return text if not interval else f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]"


def settings_text(row: dict[str, Any]) -> str:
    """The setting of the best LDS (whose runtime is reported), then in brackets LOO's and
    AUC's where their best came from another setting of the grid."""
    def fmt(params: Any) -> str:
        return ", ".join(f"{k}={v}" for k, v in (params or {}).items())

    others = [f"{m.upper()}: {fmt(row[f'{m}_params'])}" for m in ("loo", "auc")
              if row.get(f"{m}_params") not in (None, row.get("params"))]
    return fmt(row.get("params")) + (f" ({'; '.join(others)})" if others else "")


def results_markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table (best value per metric over the settings tried)."""
    title = (f"### {results['setting']} (n_train={results['n_train']}, "
             f"n_test={results['n_test']}"
             f"{', hyperparameter search' if results.get('search') else ''}"
             f"{', smoke' if results['smoke'] else ''})")
    lines = [title, "", "Best value of each metric over the settings tried, with its 95 % "
             "percentile-bootstrap interval (1,000 resamples of the test examples; for AUC of "
             "the noisy and clean training examples). Seconds and peak RSS: cache + attribute "
             "at the setting with the best LDS; settings: that setting, and in brackets LOO's and "
             "AUC's best where they differ.", "",
             "| method | LDS | LOO | AUC | seconds | peak RSS (MB) | settings |",
             "|---|---|---|---|---|---|---|"]
    for row in results["methods"]:
        if "error" in row:
            lines.append(f"| {row['method']} | error: {row['error'][:80]} | | | | | |")
            continue
        params = settings_text(row)
        if row.get("searched") is False and results.get("search"):
            params = f"{params} (defaults, no search)".lstrip()
        lines.append(f"| {row['method']} | {_metric(row, 'lds')} | {_metric(row, 'loo')} | "
                     f"{_metric(row, 'auc')} | {_fmt(row.get('seconds'), 1)} | "
                     f"{_fmt(row.get('peak_rss_mb'), 0)} | {params} |")
    return "\n".join(lines) + "\n"


def results_chart(results: dict[str, Any], path: str | Path) -> Path | None:
    """Write a PNG: LDS per method, and runtime against LDS. ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in results["methods"] if r.get("lds") is not None]
    if not rows:
        return None
    names = [r["method"] for r in rows]
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(11, 4))
    # 95 % bootstrap interval as error bars, where the run computed one
    errors = [[r["lds"] - r["lds_ci"][0] if r.get("lds_ci") else 0.0 for r in rows],
              [r["lds_ci"][1] - r["lds"] if r.get("lds_ci") else 0.0 for r in rows]]
    bars.bar(names, [r["lds"] for r in rows], yerr=errors, capsize=3, color="#ff9d00")
    bars.set_ylabel("LDS (Spearman)")
    bars.set_title(f"{results['setting']}: LDS per method")
    bars.tick_params(axis="x", rotation=45)
    bars.axhline(0, color="black", linewidth=0.8)
    scatter.scatter([r["seconds"] for r in rows], [r["lds"] for r in rows], color="#1f6feb")
    for r in rows:
        scatter.annotate(r["method"], (r["seconds"], r["lds"]), fontsize=8,
                         xytext=(3, 3), textcoords="offset points")
    scatter.set_xscale("log")
    scatter.set_xlabel("cache + attribute (s, log scale)")
    scatter.set_ylabel("LDS")
    scatter.set_title("runtime vs LDS")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
