"""The Markdown tables of the method benchmark, from the children's JSON results.

One row per (case, row): each library's ``cache+attribute`` and ``self_attribute`` seconds,
peak RSS, and with both libraries the ratio dattri time / hf_attrib time (``> x`` when the
dattri run hit the timeout: a lower bound) and ``r(scores)``, the Pearson correlation of the
two libraries' ``attribute`` scores; then the same ratios on process CPU time.
"""

from __future__ import annotations

from pathlib import Path

LIBS = ("hf_attrib", "dattri")


def fmt_s(x: float | None) -> str:
    """Seconds as shown in the tables (2 decimals below 100 s)."""
    if x is None:
        return "n/a"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _cell_time(res: dict | None, key: str, status_key: str | None = None) -> str:
    if res is None:
        return "-"
    if res.get("status") == "timeout" and res.get(key) is None:
        if status_key:  # self_attribute runs after attribute
            return "not run (attribute timed out)"
        return f"> {res['timeout_lower_s']:.0f} (timeout)"
    if res.get("status") != "ok":
        return f"n/a ({res.get('reason', res.get('status'))})"
    if status_key and res.get(status_key, "ok") != "ok":
        return res[status_key]
    return fmt_s(res.get(key))


def _ratio(hf: dict | None, dt: dict | None, key: str, status_key: str | None = None) -> str:
    if hf is None or dt is None or hf.get(key) is None:
        return "-"
    if status_key and hf.get(status_key, "ok") != "ok":
        return "-"
    if dt.get(key) is not None and (status_key is None or dt.get(status_key, "ok") == "ok"):
        return f"{dt[key] / hf[key]:.1f}x"
    lower = dt.get("self_timeout_lower_s") if status_key else (
        dt.get("timeout_lower_s") if dt.get("status") == "timeout" else None)
    if status_key and dt.get("status") == "timeout":
        return "-"
    if lower is not None:
        return "timeout" if "cpu" in key else f"> {lower / hf[key]:.1f}x"
    return "n/a"


def _corr(workdir: Path, case: str, method: str) -> str:
    """Pearson r between the two libraries' attribute scores (same data, same checkpoints)."""
    import numpy as np

    paths = [workdir / "runs" / f"{lib}-{case}-{method}.scores.pt" for lib in LIBS]
    if not all(p.exists() for p in paths):
        return "-"
    try:
        import torch

        a, b = (torch.load(p).numpy().ravel() for p in paths)
    except Exception:
        return "-"
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return "-"
    if a.std() == 0 or b.std() == 0:
        return "-"
    return f"{float(np.corrcoef(a, b)[0, 1]):+.2f}"


def render_table(results: dict, cases: list[str], methods: dict[str, list[str]], libs: list[str],
                 workdir: Path) -> str:
    """The times table (and, with both libraries, the CPU-time ratios) of ``results``,
    keyed by ``(lib, case, row)``; ``methods[case]`` lists the rows in order."""
    both = "dattri" in libs
    head = ["case", "method", "hf_attrib cache+attribute (s)"]
    if both:
        head += ["dattri cache+attribute (s)", "ratio"]
    head += ["hf_attrib self_attribute (s)"]
    if both:
        head += ["dattri self_attribute (s)", "ratio"]
    head += ["hf_attrib peak RSS (MB)"]
    if both:
        head += ["dattri peak RSS (MB)", "r(scores)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        for method in methods[case]:
            hf = results.get(("hf_attrib", case, method))
            dt = results.get(("dattri", case, method)) if both else None
            row = [case, method, _cell_time(hf, "cache_attribute_s")]
            if both:
                row += [_cell_time(dt, "cache_attribute_s"),
                        _ratio(hf, dt, "cache_attribute_s")]
            row += [_cell_time(hf, "self_attribute_s", "self_status")]
            if both:
                row += [_cell_time(dt, "self_attribute_s", "self_status"),
                        _ratio(hf, dt, "self_attribute_s", "self_status")]
            row += [f"{hf['peak_rss_mb']:.0f}" if hf and hf.get("peak_rss_mb") else "-"]
            if both:
                row += [f"{dt['peak_rss_mb']:.0f}" if dt and dt.get("peak_rss_mb") else "-",
                        _corr(workdir, case, method)]
            lines.append("| " + " | ".join(row) + " |")
    if both:
        lines += ["", "CPU-time ratios (dattri / hf_attrib process CPU time of the same phases; "
                  "less sensitive to other load on the machine than wall time):", "",
                  "| case | method | cache+attribute | self_attribute |", "|---|---|---|---|"]
        for case in cases:
            for method in methods[case]:
                hf = results.get(("hf_attrib", case, method))
                dt = results.get(("dattri", case, method))
                lines.append(f"| {case} | {method} | "
                             f"{_ratio(hf, dt, 'cache_attribute_cpu_s')} | "
                             f"{_ratio(hf, dt, 'self_attribute_cpu_s', 'self_status')} |")
    return "\n".join(lines)
