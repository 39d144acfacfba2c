"""Push an index folder to the Hub and pull it back, whole or only the shards of some rows.

Both go through ``hf_attrib.hub.transfer``: the push checks every file against the index's
sha256 first and, by default, uploads resumably in several commits (run the same push again
after an interruption: files already committed are skipped); the pull downloads the index file,
then exactly the files wanted, each checked against its sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_attrib.hub.layout import read_index
from hf_attrib.hub.transfer import pull_files, push
from hf_attrib.index.format import BUILD_DIR, FEATURES_KIND, STATE_FILE, parse_rows

__all__ = ["pull_index", "push_index", "shards_for_rows"]


def push_index(folder: str | Path, repo_id: str, *, endpoint: str | None = None,
               token: str | None = None, revision: str | None = None,
               private: bool | None = None, resumable: bool = True) -> str:
    """Upload an index folder (``build``'s ``out``) as a model repo.

    Args:
        folder: the index folder (its ``.build`` bookkeeping is not uploaded).
        repo_id: the target repo (created if missing).
        endpoint, token, revision, private: as for ``hf_attrib.hub.push``.
        resumable: upload in several commits and skip files already committed when run
            again (``push(large=True)``); ``False``: one commit.

    Returns:
        The last commit id (or the repo URL).

    Raises:
        ValueError: ``folder`` is not a finished index (its build is incomplete).
    """
    folder = Path(folder)
    if not (folder / "hf_attrib_index.json").is_file() and (folder / BUILD_DIR).is_dir():
        raise ValueError(f"{folder} is an unfinished index build (no hf_attrib_index.json): "
                         "run the same `hf-attrib index build` again (or the missing --shard "
                         "parts) to finish it, then push.")
    _check_is_index(read_index(folder), folder)
    return push(folder, repo_id, "model", endpoint=endpoint, token=token, revision=revision,
                private=private, large=resumable,
                commit_message=f"hf-attrib: attribution index ({folder.name})")


def _check_is_index(index: dict[str, Any], where: Any) -> None:
    if "attribution_index" not in index or FEATURES_KIND not in index.get("kinds", {}):
        raise ValueError(f"{where} is an hf-attrib repo but not an attribution index; push it "
                         "with `hf-attrib hub push` instead.")


def shards_for_rows(index: dict[str, Any], rows: Any = None) -> list[str]:
    """The feature shard files holding any of ``rows`` (``"a:b"``, ``(a, b)``; default all)."""
    entry = index["kinds"][FEATURES_KIND]
    wanted = parse_rows(rows, int(entry["num_rows"]))
    return [sh["file"] for sh in entry["shards"]
            if sh["start"] < wanted.stop and sh["stop"] > wanted.start]


def pull_index(repo_id: str, *, out: str | Path | None = None, rows: Any = None,
               revision: str | None = None, endpoint: str | None = None,
               token: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Download an index repo: its index file, card, state and the shards of ``rows``.

    Args:
        repo_id: the index repo.
        out: download into this folder (default: the Hugging Face cache).
        rows: only the shards of these rows (``"a:b"``; default every shard).
        revision, endpoint, token, cache_dir: as for ``hf_attrib.hub.pull``.

    Returns:
        The local index folder (open it with ``Index.open``).
    """
    def select(index: dict[str, Any]) -> list[str]:
        _check_is_index(index, f"the repo {repo_id}")
        state = [STATE_FILE] if STATE_FILE in index["files"] else []
        return state + shards_for_rows(index, rows)

    path, _ = pull_files(repo_id, "model", select, out=out, revision=revision,
                         endpoint=endpoint, token=token, cache_dir=cache_dir)
    return path
