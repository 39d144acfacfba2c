#!/usr/bin/env python
"""The MNIST-10 results beside the dattri paper's, as Markdown (recipes/mnist/README.md).

    python recipes/mnist/paper_table.py recipes/mnist/results/mnist_lr.json \
        recipes/mnist/results/mnist_mlp.json > recipes/mnist/results/paper_side_by_side.md
    python recipes/mnist/paper_table.py --write    # also fills the READMEs' tables from them

``--write`` rewrites, from ``recipes/mnist/results/mnist_{lr,mlp}.json``, the marked sections of
the top-level README (``mnist-lr-table``, ``mnist-mlp-table``), of ``recipes/mnist/README.md``
(``side-by-side``, ``table4``) and ``results/paper_side_by_side.md``; the tests check that the
committed files equal what it writes.

The paper prints Figures 2 and 4 (LOO, LDS, AUC) as bar charts without their values; what its
text states is used here: Table 1's grades ("-" similar to random, "+" better than random, "++"
much better), the statements of Section 4.2, and Table 4's runtimes and peak memory (MNIST-10 +
MLP, one A40). dattri's own number where its repository prints one: the CG example of
``experiments/readme.md`` (MNIST + LR, LDS 0.767 at regularization 0.1, 10 iterations).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hf_attrib.benchmark.report import settings_text

# Table 1 of the paper: (LOO, LDS, AUC) grades, linear (LR) and non-linear (MLP) columns.
PAPER_GRADES: dict[str, dict[str, tuple[str, str, str]]] = {
    "if-explicit": {"lr": ("++", "++", "++"), "mlp": ("-", "-", "-")},
    "if-cg": {"lr": ("++", "++", "++"), "mlp": ("-", "+", "+")},
    "if-lissa": {"lr": ("++", "++", "++"), "mlp": ("-", "+", "+")},
    "if-arnoldi": {"lr": ("+", "+", "++"), "mlp": ("-", "-", "+")},
    "tracin": {"lr": ("+", "+", "++"), "mlp": ("-", "+", "+")},
    "grad-dot": {"lr": ("+", "+", "++"), "mlp": ("-", "+", "+")},
    "grad-cos": {"lr": ("+", "+", "-"), "mlp": ("-", "+", "-")},
    "rps": {"lr": ("+", "+", "++"), "mlp": ("-", "-", "+")},
    "trak-1": {"lr": ("++", "++", "++"), "mlp": ("-", "++", "++")},
    "trak-10": {"lr": ("++", "++", "++"), "mlp": ("-", "++", "++")},
    "trak-50": {"lr": ("++", "++", "++"), "mlp": ("-", "++", "++")},
}
# dattri's printed LDS for MNIST + LR (experiments/readme.md of its repository).
DATTRI_LR_LDS = {"if-cg": 0.767}
# Table 4 (MNIST-10 + MLP, one A40 48 GB): runtime (s) and peak memory (MB); None = OOM.
PAPER_TABLE4 = {
    "if-explicit": (None, None), "if-cg": (610.79, 966.99), "if-lissa": (498.53, 323.54),
    "if-arnoldi": (455.80, 250.50), "tracin": (85.89, 214.24), "grad-dot": (9.06, 214.24),
    "grad-cos": (8.76, 214.24), "rps": (1.08, 72.09), "trak-1": (1.83, 206.99),
    "trak-10": (13.71, 598.67), "trak-50": (67.74, 2236.08),
}
NAMES = {"if-explicit": "IF explicit", "if-cg": "IF CG", "if-lissa": "IF LiSSA",
         "if-arnoldi": "IF Arnoldi", "tracin": "TracInCP", "grad-dot": "Grad-Dot",
         "grad-cos": "Grad-Cos", "rps": "RPS-L2", "trak-1": "TRAK-1", "trak-10": "TRAK-10",
         "trak-50": "TRAK-50"}


def _value(row: dict[str, Any] | None, metric: str) -> str:
    if row is None:
        return "not run"
    if "error" in row and row.get(metric) is None:
        return "failed (" + row["error"].split(":")[0] + ")"
    value = row.get(metric)
    if value is None:
        return "not run" if metric == "auc" and row.get("auc_skipped") else "-"
    interval = row.get(f"{metric}_ci")
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def side_by_side(results: dict[str, Any], key: str) -> str:
    """Per method: the paper's grades, ours with intervals, dattri's number."""
    rows = {r["method"]: r for r in results["methods"]}
    title = (f"**{results['setting']}** ({results['n_train']} train / {results['n_test']} test, "
             f"{results.get('loo_examples', 0)} LOO models)")
    lines = [title, "",
             "| method | paper LOO / LDS / AUC (Table 1) | LOO | LDS | AUC | dattri LDS | "
             "settings |", "|---|---|---|---|---|---|---|"]
    for method, name in NAMES.items():
        row = rows.get(method)
        grade = " / ".join(PAPER_GRADES[method][key])
        dattri = DATTRI_LR_LDS.get(method) if key == "lr" else None
        params = "" if row is None else settings_text(row)
        if row is not None and row.get("searched") is False:
            params += " (defaults)"
        lines.append(f"| {name} | {grade} | {_value(row, 'loo')} | {_value(row, 'lds')} | "
                     f"{_value(row, 'auc')} | {'' if dattri is None else dattri} | {params} |")
    return "\n".join(lines) + "\n"


def table4(results: dict[str, Any]) -> str:
    """Runtime and memory in the form of the paper's Table 4 (its values beside ours)."""
    rows = {r["method"]: r for r in results["methods"]}
    lines = ["| method | paper runtime (A40) | paper peak GPU memory | ours: cache + attribute "
             "(2-core CPU) | ours: peak RSS |", "|---|---|---|---|---|"]
    for method, name in NAMES.items():
        paper_s, paper_mb = PAPER_TABLE4[method]
        row = rows.get(method)
        if row is None:
            ours_s = ours_mb = "not run"
        elif row.get("seconds") is None:
            ours_s, ours_mb = "failed (" + row.get("error", "?").split(":")[0] + ")", "-"
        else:
            ours_s, ours_mb = f"{row['seconds']:.1f} s", f"{row['peak_rss_mb']:.0f} MB"
        lines.append(f"| {name} | {'OOM' if paper_s is None else f'{paper_s:.2f} s'} | "
                     f"{'OOM' if paper_mb is None else f'{paper_mb:.2f} MB'} | {ours_s} | "
                     f"{ours_mb} |")
    return "\n".join(lines) + "\n"


def _compact(row: dict[str, Any], metric: str) -> str:
    if metric == "auc" and row.get("auc_skipped"):
        return "not run"
    if row.get(metric) is None:
        return "out of memory" if "MemoryError" in row.get("error", "") else "failed"
    interval = row.get(f"{metric}_ci")
    return f"{row[metric]:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def readme_table(results: dict[str, Any]) -> str:
    """The top-level README's table of a setting: LDS, LOO, AUC with intervals."""
    mlp = "mlp" in results["setting"]
    title = (f"MNIST-MLP (784-128-64-10, dropout 0.1; LOO over {results['loo_examples']:,} "
             "models):" if mlp else "MNIST-LR (logistic regression, 7,840 weights):")
    lines = [title, "", "| method | LDS | LOO | AUC |", "|---|---|---|---|"]
    for row in results["methods"]:
        name = NAMES[row["method"]] + (" (5 ckpts)" if row["method"] == "tracin" else "")
        lines.append(f"| {name} | " + " | ".join(_compact(row, m) for m in ("lds", "loo", "auc"))
                     + " |")
    return "\n".join(lines) + "\n"


def sections(results_dir: Path) -> dict[tuple[str, str], str]:
    """``(file, marker) -> text`` of every table ``--write`` fills, from the results files."""
    lr = json.loads((results_dir / "mnist_lr.json").read_text())
    mlp = json.loads((results_dir / "mnist_mlp.json").read_text())
    return {
        ("README.md", "mnist-lr-table"): readme_table(lr),
        ("README.md", "mnist-mlp-table"): readme_table(mlp),
        ("recipes/mnist/README.md", "side-by-side"): side_by_side(lr, "lr") + "\n"
        + side_by_side(mlp, "mlp") + "\n" + table4(mlp),
        ("recipes/mnist/README.md", "table4"): table4(mlp),
    }


def replace_section(text: str, marker: str, body: str) -> str:
    """``text`` with what lies between ``<!-- marker:start -->`` and ``<!-- marker:end -->``
    replaced by ``body``."""
    start, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"expected one {start.strip()} ... {end} section")
    head, rest = text.split(start)
    return head + start + body + end + rest.split(end, 1)[1]


def write(root: Path) -> None:
    results_dir = root / "recipes" / "mnist" / "results"
    tables = sections(results_dir)
    for (name, marker), body in tables.items():
        path = root / name
        path.write_text(replace_section(path.read_text(), marker, body))
    (results_dir / "paper_side_by_side.md").write_text(
        tables[("recipes/mnist/README.md", "side-by-side")] + "\n")


def main() -> None:
    if sys.argv[1:] == ["--write"]:
        write(Path(__file__).resolve().parents[2])
        return
    for path in sys.argv[1:]:
        results = json.loads(Path(path).read_text())
        key = "mlp" if "mlp" in results["setting"] else "lr"
        print(side_by_side(results, key))
        if key == "mlp":
            print(table4(results))


if __name__ == "__main__":
    main()
