#!/usr/bin/env python
"""A real export through the tests' local Hub: push, range pull, full pull, `bench run --from-hub`.

    python recipes/mnist/hub_roundtrip.py recipe-out/mnist/full/mnist_lr/export [--method grad-dot]

Starts the local Hub of ``tests/hub_server.py`` (olah + a write front server) in a temporary
folder, pushes both repos of the export (``hf-attrib hub push``), pulls the checkpoints of
models 0..9 (``hub pull --what checkpoints --models 0:10``: which files came and their bytes),
pulls the whole benchmark, and runs ``hf-attrib bench run SETTING --from-hub`` with one method
on the pull. Prints one JSON object (seconds, files, bytes, the method's LDS/LOO/AUC: compare
with the local run's row, which must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from hub_server import LocalHub  # noqa: E402


def _files(folder: Path) -> list[Path]:
    # huggingface_hub keeps its download bookkeeping under .cache/ of a local_dir download
    return [p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path, help="an `hf-attrib hub export` folder")
    ap.add_argument("--method", default="grad-dot")
    ap.add_argument("--models", default="0:10")
    args = ap.parse_args()
    index = json.loads((args.export / "dataset" / "hf_attrib_index.json").read_text())
    setting = index["setting"].replace("_", "-")
    repo = f"hf-attrib/{setting}"
    root = Path(tempfile.mkdtemp(prefix="hub-roundtrip-"))
    out: dict = {"setting": setting}
    with LocalHub(root / "hub") as hub:
        # A loaded machine serves 17 MB shards slowly through the proxy: generous timeouts.
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_local_dummy_token",
               "HF_HOME": str(root / "hf_home"), "HF_HUB_DOWNLOAD_TIMEOUT": "120",
               "HF_HUB_ETAG_TIMEOUT": "60"}

        def run(*cli: str) -> float:
            start = time.perf_counter()
            done = subprocess.run(["hf-attrib", *cli], env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"hf-attrib {' '.join(cli)} failed:\n{done.stderr[-3000:]}")
            return round(time.perf_counter() - start, 1)

        out["push_s"] = run("hub", "push", str(args.export), "--repo-id", repo)
        part = root / "pull-range"
        out["pull_range_s"] = run("hub", "pull", repo, "--what", "checkpoints", "--models",
                                  args.models, "--out", str(part))
        files = _files(part)
        out["pull_range_files"] = sorted(p.relative_to(part).as_posix() for p in files)
        out["pull_range_bytes"] = sum(p.stat().st_size for p in files)
        for name in ("dataset", "checkpoints"):
            out[f"export_{name}_bytes"] = sum(p.stat().st_size
                                              for p in _files(args.export / name))
        out["pull_all_s"] = run("hub", "pull", repo, "--out", str(root / "pull-all"))
        out["bench_from_hub_s"] = run("bench", "run", setting, "--from-hub",
                                      str(root / "pull-all"), "--methods", args.method,
                                      "--out", str(root / "bench"), "--no-progress")
        row = json.loads((root / "bench" / "results.json").read_text())["methods"][0]
        out["from_hub"] = {k: row.get(k) for k in ("method", "lds", "loo", "auc")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
