"""``push``, ``pull`` and ``push_results``: move hf_attrib repos to and from the Hub.

The endpoint is ``endpoint=`` or ``HF_ENDPOINT``; the token is ``token=`` or the usual Hugging
Face places (``HF_TOKEN``, ``hf auth login``), read by ``huggingface_hub`` and never printed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    get_token,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hf_attrib.hub.errors import (
    HubAuthError,
    HubConnectionError,
    HubError,
    HubIntegrityError,
    HubNotFoundError,
    HubPathError,
)
from hf_attrib.hub.layout import (
    CHECKPOINTS_SUFFIX,
    DEFAULT_ORG,
    INDEX_FILE,
    RESULTS_FORMAT,
    check_folder,
    checkpoints_repo_id,
    confined_path,
    dataset_repo_id,
    indexed_names,
    parse_index,
    setting_slug,
    verify_file,
)

__all__ = ["PullResult", "pull", "pull_files", "push", "push_results", "resolve_repos"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
WHAT = ("data", "ground-truth", "checkpoints")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) says the Hub could not be reached: a network error
    of the HTTP client huggingface_hub uses, offline mode, or huggingface_hub's "not in the
    local cache" after a failed lookup."""
    network: list[type[BaseException]] = [LocalEntryNotFoundError, OfflineModeIsEnabled]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        if module in sys.modules:  # only the clients already in use
            network.append(getattr(sys.modules[module], name))
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, tuple(network)):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


_READ_HINT = ("use --data-dir / a local folder: pass an `hf-attrib hub export` or `hub pull "
              "--out` folder instead of the repo id (`bench run --from-hub DIR`, "
              "`load_benchmark(setting, DIR)`) and --data-dir for a setting's source data, or "
              "check the network and the endpoint (HF_ENDPOINT / --endpoint).")
_WRITE_HINT = ("check the network and the endpoint (HF_ENDPOINT / --endpoint), then push "
               "again (files already on the Hub are skipped).")


def _unreachable_error(endpoint: str | None, err: BaseException,
                       hint: str = _READ_HINT) -> HubConnectionError:
    where = (endpoint or hf_constants.ENDPOINT).rstrip("/")
    offline = (", offline mode (HF_HUB_OFFLINE) and not in the local cache"
               if hf_constants.is_offline_mode() else "")
    cause = str(err).splitlines()[0] if str(err) else ""
    return HubConnectionError(f"cannot reach the Hub ({where}{offline}); {hint} "
                              f"[{type(err).__name__}: {cause}]")


def _hub_call(fn: Callable[[], T], repo_id: str, repo_type: str, revision: str | None,
              filename: str | None = None, endpoint: str | None = None,
              hint: str = _READ_HINT) -> T:
    """Run a huggingface_hub call; turn its not-found and network errors into ones that say
    what to do (``hint``: the fix when the Hub cannot be reached)."""
    kind = "dataset" if repo_type == "dataset" else repo_type
    try:
        return fn()
    except Exception as err:
        # LocalEntryNotFoundError is an EntryNotFoundError, but means "no network and not in
        # the cache", not "no such file" (the old message said "file None not found").
        not_found = (None if isinstance(err, LocalEntryNotFoundError)
                     else _not_found(err, kind, repo_id, revision, filename))
        if not_found is not None:
            raise not_found from err
        if _unreachable(err):
            raise _unreachable_error(endpoint, err, hint) from err
        raise


def _not_found(err: Exception, kind: str, repo_id: str, revision: str | None,
               filename: str | None) -> HubNotFoundError | None:
    """The :class:`HubNotFoundError` for one of huggingface_hub's not-found errors."""
    if isinstance(err, RevisionNotFoundError):
        return HubNotFoundError(
            f"revision {revision!r} not found in the {kind} repo {repo_id}: pass an existing "
            "branch, tag or commit (--revision), or omit it for 'main'.")
    if isinstance(err, EntryNotFoundError):
        return HubNotFoundError(
            f"file {filename!r} not found in the {kind} repo {repo_id} at revision "
            f"{revision or 'main'}: it is not an hf-attrib {kind} repo, or was pushed "
            "incompletely; re-export and push it (`hf-attrib hub export` / `hub push`).")
    if isinstance(err, RepositoryNotFoundError):
        return HubNotFoundError(
            f"{kind} repo {repo_id} not found (or not visible with your token): check the repo "
            "id and --repo-type, the endpoint (HF_ENDPOINT / --endpoint), and log in with "
            "`hf auth login` for a private repo.")
    return None


def _require_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise HubAuthError(
            "no Hugging Face token found for this push: run `hf auth login`, or set HF_TOKEN "
            "(a token with write access to the repo).")
    return token


# --------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------
def push(folder: str | Path, repo_id: str, repo_type: str | None = None, *,
         endpoint: str | None = None, token: str | None = None, revision: str | None = None,
         private: bool | None = None, commit_message: str | None = None,
         large: bool = False) -> str:
    """Upload a repo folder written by :func:`~hf_attrib.hub.export` (one commit).

    The folder is checked first (:func:`~hf_attrib.hub.layout.check_folder`): every file its
    index names must be inside it, present and match its recorded sha256, or nothing is
    uploaded. Only the index, ``README.md`` and the files the index names are uploaded.
    Unchanged files are skipped, so pushing an unchanged export again makes no commit.

    Args:
        folder: the folder (``export_dir/dataset`` or ``export_dir/checkpoints``).
        repo_id: the target repo; created if missing (``create_repo(exist_ok=True)``).
        repo_type: ``"dataset"`` or ``"model"``; default from the folder's index.
        endpoint: Hub endpoint (default ``HF_ENDPOINT`` / huggingface.co).
        token: write token (default: the saved one / ``HF_TOKEN``).
        revision: branch to commit to (default ``main``).
        private: visibility of a newly created repo.
        commit_message: default ``"hf-attrib: upload <setting>"``.
        large: upload very large sets resumably in many commits: ``upload_large_folder`` on
            huggingface_hub < 2; on huggingface_hub >= 2 (which removed it) ``upload_folder``
            with ``hf_xet``, which commits in batches and skips already-committed files when
            the same push is run again. An interrupted large push raises :class:`HubError`
            saying to run it again.

    Returns:
        The commit id (of the last commit), or the repo URL (``upload_large_folder``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubNotFoundError(f"{folder} is not a folder; export one with `hf-attrib hub "
                               "export SETTING --out DIR`.")
    index = check_folder(folder)
    # Exactly the checked files (names hold no glob characters: check_relative refuses them).
    files = [INDEX_FILE, *indexed_names(index)]
    if (folder / "README.md").is_file():
        confined_path(folder, "README.md", "the repo card")
        files.append("README.md")
    repo_type = repo_type or index.get("repo_type", "dataset")
    token = _require_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    _hub_call(lambda: api.create_repo(repo_id, repo_type=repo_type, private=private,
                                      exist_ok=True), repo_id, repo_type, revision,
              endpoint=endpoint, hint=_WRITE_HINT)
    message = commit_message or f"hf-attrib: upload {index.get('setting', folder.name)}"
    if large and hasattr(api, "upload_large_folder"):  # huggingface_hub 0.25 to 1.x
        _hub_call(lambda: api.upload_large_folder(
            repo_id=repo_id, folder_path=folder, repo_type=repo_type, revision=revision,
            private=private, allow_patterns=files, ignore_patterns=[".cache/**"]), repo_id,
            repo_type, revision, endpoint=endpoint, hint=_WRITE_HINT)
        return f"{api.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
    if large:  # huggingface_hub >= 2: upload_folder is the resumable multi-commit upload
        _require_multi_commit_upload()
    try:
        info = _hub_call(lambda: api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type=repo_type, revision=revision,
            commit_message=message, allow_patterns=files, ignore_patterns=[".cache/**"]),
            repo_id, repo_type, revision, endpoint=endpoint, hint=_WRITE_HINT)
    except HfHubHTTPError as err:
        if not large:
            raise
        raise HubError(
            f"the upload of {folder} to {repo_id} stopped midway ({err}); the files committed "
            "so far are on the Hub: run the same push again to upload the rest (unchanged "
            "files are skipped).") from err
    return info.oid


def _require_multi_commit_upload() -> None:
    """``large=True`` on huggingface_hub >= 2, which dropped ``upload_large_folder``: its
    ``upload_folder`` commits in batches and resumes only through ``hf_xet``'s pipeline;
    without it everything would go into one commit, which is what ``large`` is meant to avoid.
    """
    import importlib.util

    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_DISABLE_XET", False) or importlib.util.find_spec(
            "hf_xet") is None:
        raise HubError(
            "push(large=True) / --large needs the resumable multi-commit upload: huggingface_hub"
            " >= 2 has no upload_large_folder and uploads in batches of commits only with "
            "hf_xet: `pip install hf_xet` (and do not set HF_HUB_DISABLE_XET), or push without "
            "--large (one commit).")


# --------------------------------------------------------------------------------------------
# pull
# --------------------------------------------------------------------------------------------
@dataclass
class PullResult:
    """Where :func:`pull` put things.

    Attributes:
        dataset_dir: local folder of the dataset repo (``None`` if not pulled).
        checkpoints_dir: local folder of the checkpoint repo (``None`` if not pulled).
        files: repo paths downloaded (or found in the cache) per repo.
    """

    dataset_dir: Path | None
    checkpoints_dir: Path | None
    files: dict[str, list[str]]


def resolve_repos(setting_or_repo: str, org: str = DEFAULT_ORG) -> tuple[str, str]:
    """``(dataset repo id, checkpoints repo id)`` of a setting name or either repo id."""
    if "/" not in setting_or_repo:
        from hf_attrib.benchmark.settings import get_setting

        name = get_setting(setting_or_repo).name
        return dataset_repo_id(name, org), checkpoints_repo_id(name, org)
    if setting_or_repo.endswith(CHECKPOINTS_SUFFIX):
        return setting_or_repo[: -len(CHECKPOINTS_SUFFIX)], setting_or_repo
    return setting_or_repo, setting_or_repo + CHECKPOINTS_SUFFIX


def shards_for(index: dict[str, Any], kind: str, models: Any = None) -> list[str]:
    """Shard files of ``kind`` holding any model id in ``models`` (``a:b``; default all)."""
    entry = index.get("kinds", {}).get(kind)
    if entry is None:
        raise HubNotFoundError(f"the checkpoint index has no kind {kind!r} (it has "
                               f"{sorted(index.get('kinds', {}))}).")
    if "file" in entry:
        return [entry["file"]]
    if models is None:
        return [sh["file"] for sh in entry["shards"]]
    # Imported here, where a range is given: push, and pull without --models, stay torch-free.
    from hf_attrib.model_utils.block_store import parse_model_range

    a, b = parse_model_range(models)
    if not 0 <= a < b or a >= entry["num_models"]:
        raise ValueError(f"models {a}:{b} outside the {entry['num_models']} {kind} models.")
    return [sh["file"] for sh in entry["shards"] if sh["start"] < b and sh["stop"] > a]


def _verify(local: Path, index: dict[str, Any], files: Iterable[str],
            refetch: Callable[[str], Path]) -> None:
    """Check every downloaded file against the index's SHA-256; re-fetch a bad one once.

    Every name is one the index lists in ``files`` (:func:`parse_index` refuses an index
    naming a file without a hash), so nothing downloaded goes unchecked.
    """
    recorded = index["files"]
    for name in files:
        try:
            verify_file(confined_path(local, name), recorded[name], name)
            continue
        except HubIntegrityError:
            logger.warning("%s does not match its recorded sha256; downloading it again", name)
        path = refetch(name)
        try:
            verify_file(path, recorded[name], name)
        except HubIntegrityError:
            raise HubIntegrityError(
                f"{name} is corrupted: its sha256 does not match the one in {INDEX_FILE} even "
                f"after downloading it again ({path}); the copy on the Hub is damaged: "
                "re-export and push the repo, or report it to the repo's owners.") from None


def _fetch_index(repo_id: str, repo_type: str, kwargs: dict[str, Any],
                 endpoint: str | None) -> dict[str, Any]:
    """Download and validate a repo's index; a damaged one (a corrupt cached copy: not JSON,
    not an index) is downloaded again once before it is an error."""
    revision = kwargs.get("revision")
    source = f"{INDEX_FILE} of the {repo_type} repo {repo_id}"

    def read(force: bool) -> dict[str, Any]:
        path = _hub_call(lambda: hf_hub_download(repo_id, INDEX_FILE, force_download=force,
                                                 **kwargs),
                         repo_id, repo_type, revision, INDEX_FILE, endpoint)
        return parse_index(Path(path).read_bytes(), source)

    try:
        return read(False)
    except (HubIntegrityError, HubPathError) as err:
        logger.warning("%s; downloading it again", err)
    try:
        return read(True)
    except (HubIntegrityError, HubPathError) as err:
        raise type(err)(f"{err} (the index was downloaded again and is still damaged: the copy "
                        "on the Hub is; re-export and push the repo, or report it to the repo's "
                        "owners)") from None


def _pull_repo(repo_id: str, repo_type: str, select: Callable[[dict[str, Any]], list[str]], *,
               out: Path | None, revision: str | None, endpoint: str | None,
               token: str | None, cache_dir: str | Path | None,
               verify: bool) -> tuple[Path, list[str]]:
    """Download the index of ``repo_id``, then exactly the indexed files ``select(index)``
    picks (and the card), and verify them."""
    kwargs = dict(repo_type=repo_type, revision=revision, endpoint=endpoint, token=token,
                  cache_dir=cache_dir)
    if out is not None:
        kwargs["local_dir"] = out
    index = _fetch_index(repo_id, repo_type, kwargs, endpoint)
    wanted = sorted(set(select(index)))  # all listed in index["files"] (parse_index)
    # Exact names as patterns (check_relative refused glob characters in them).
    patterns = ["README.md", INDEX_FILE, *wanted]
    path = Path(_hub_call(lambda: snapshot_download(repo_id, allow_patterns=patterns,
                                                    **kwargs),
                          repo_id, repo_type, revision, endpoint=endpoint))
    got = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                 if p.is_file() and ".cache" not in p.relative_to(path).parts)
    missing = [f for f in wanted if not confined_path(path, f).is_file()]
    if missing:
        raise HubNotFoundError(f"{repo_id} at {revision or 'main'} lacks {missing} listed in its "
                               f"{INDEX_FILE}: the repo was pushed incompletely; push it again.")
    if verify:
        def refetch(name: str) -> Path:
            return Path(_hub_call(lambda: hf_hub_download(repo_id, name, force_download=True,
                                                          **kwargs),
                                  repo_id, repo_type, revision, name, endpoint))

        _verify(path, index, wanted, refetch)
    return path, got


def pull_files(repo_id: str, repo_type: str, select: Callable[[dict[str, Any]], list[str]], *,
               out: str | Path | None = None, revision: str | None = None,
               endpoint: str | None = None, token: str | None = None,
               cache_dir: str | Path | None = None, verify: bool = True
               ) -> tuple[Path, list[str]]:
    """Download any hf-attrib repo's index, then exactly the indexed files ``select(index)``
    picks (and the card), each checked against its sha256 (see :func:`pull`).

    Returns:
        ``(local folder, repo paths present there)``.
    """
    return _pull_repo(repo_id, repo_type, select, out=None if out is None else Path(out),
                      revision=revision, endpoint=endpoint or hf_constants.ENDPOINT,
                      token=token, cache_dir=cache_dir, verify=verify)


def pull(setting_or_repo: str, what: Sequence[str] = WHAT, *, models: Any = None,
         kinds: Sequence[str] | None = None, out: str | Path | None = None,
         revision: str | None = None, endpoint: str | None = None, token: str | None = None,
         cache_dir: str | Path | None = None, org: str = DEFAULT_ORG,
         verify: bool = True) -> PullResult:
    """Download (parts of) a setting's repos with ``snapshot_download(allow_patterns=...)``.

    Args:
        setting_or_repo: a setting name (``digits-lr``: repos ``<org>/digits-lr`` and
            ``<org>/digits-lr-checkpoints``) or either repo id.
        what: any of ``"data"`` (parquet splits), ``"ground-truth"`` (safetensors ground
            truth) and ``"checkpoints"``.
        models: only the checkpoint shards holding these model ids (``"a:b"``, ``slice`` or
            ``(a, b)``); the checkpoint index is read first to find them.
        kinds: checkpoint kinds (default all: ``full``, ``lds``, ``loo``, ``noisy``).
        out: download into ``out/dataset`` and ``out/checkpoints`` (``local_dir``); default the
            Hugging Face cache.
        revision: branch, tag or commit of both repos.
        endpoint: Hub endpoint (default ``HF_ENDPOINT``).
        token: token for private repos.
        cache_dir: Hugging Face cache folder.
        org: organisation when a setting name is given.
        verify: check each file's SHA-256 against the repo's index (a mismatch is re-fetched
            once, then a :class:`HubIntegrityError` names the file).
    """
    unknown = [w for w in what if w not in WHAT]
    if unknown:
        raise ValueError(f"unknown --what {unknown}; use any of {', '.join(WHAT)}.")
    ds_id, ck_id = resolve_repos(setting_or_repo, org)
    # The endpoint the downloads use, named in their errors (huggingface_hub would otherwise
    # take a URL template fixed when it was imported).
    endpoint = endpoint or hf_constants.ENDPOINT
    out = Path(out) if out is not None else None
    common = dict(revision=revision, endpoint=endpoint, token=token, cache_dir=cache_dir,
                  verify=verify)
    files: dict[str, list[str]] = {}
    ds_dir = ck_dir = None
    prefixes = tuple(p for w, p in (("data", "data/"), ("ground-truth", "ground_truth/"))
                     if w in what)
    if prefixes:
        ds_dir, files[ds_id] = _pull_repo(
            ds_id, "dataset", lambda index: [f for f in index["files"] if f.startswith(prefixes)],
            out=out / "dataset" if out else None, **common)
    if "checkpoints" in what:
        def checkpoint_files(index: dict[str, Any]) -> list[str]:
            selected = list(kinds) if kinds is not None else list(index.get("kinds", {}))
            if kinds is None and models is not None:
                # one range over kinds of different sizes (8 LDS, 5,000 LOO models): every
                # kind that holds part of it; a range no kind holds is still an error
                from hf_attrib.model_utils.block_store import parse_model_range

                first = parse_model_range(models)[0]
                sizes = {k: index["kinds"][k]["num_models"] for k in selected
                         if k in ("lds", "loo")}
                if sizes and all(n <= first for n in sizes.values()):
                    raise ValueError(f"models {models} outside every kind of stacked models ("
                                     + ", ".join(f"{n} {k}" for k, n in sizes.items()) + ").")
                selected = [k for k in selected if k not in sizes or sizes[k] > first]
            names = [f for f in ("config.json",) if f in index["files"]]
            for kind in selected:
                names += shards_for(index, kind, models if kind in ("lds", "loo") else None)
            return names

        ck_dir, files[ck_id] = _pull_repo(ck_id, "model", checkpoint_files,
                                          out=out / "checkpoints" if out else None, **common)
    return PullResult(ds_dir, ck_dir, files)


# --------------------------------------------------------------------------------------------
# push_results
# --------------------------------------------------------------------------------------------
def _run_path(results: dict[str, Any]) -> str:
    setting = setting_slug(str(results.get("setting", "unknown")))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"runs/{setting}/{stamp}-{uuid.uuid4().hex[:12]}.json"


def push_results(results: str | Path | dict[str, Any], repo_id: str, *,
                 repo_type: str = "model", endpoint: str | None = None,
                 token: str | None = None, max_attempts: int = 8) -> str:
    """Add one run to a results repo and regenerate its README leaderboard.

    The run goes to a new file ``runs/<setting>/<utc time>-<random>.json`` (never another run's
    file). The README is rendered from every run in the repo plus this one and committed
    together with it in one commit whose ``parent_commit`` is the head the runs were read at:
    if another push lands first the Hub refuses the commit (HTTP 409/412) and this one re-reads
    the runs and retries, so concurrent pushes all survive and the leaderboard lists them all.

    Args:
        results: a ``results.json`` written by ``hf-attrib bench run`` (path or dict).
        repo_id: the results repo (created if missing).
        repo_type: ``"model"`` (default; the leaderboard card carries ``model-index``).
        endpoint: Hub endpoint.
        token: write token (default: the saved one / ``HF_TOKEN``).
        max_attempts: commits tried before giving up on a busy repo.

    Returns:
        The path of the run's file in the repo.
    """
    from hf_attrib.hub.cards import results_card

    if not isinstance(results, dict):
        path = Path(results)
        if not path.is_file():
            raise HubNotFoundError(f"{path} does not exist; `hf-attrib bench run` writes "
                                   "results.json into its --out folder.")
        results = json.loads(path.read_text())
    if not isinstance(results, dict) or "methods" not in results:
        raise ValueError("results must be the results.json of `hf-attrib bench run` (a JSON "
                         "object with 'setting' and 'methods').")
    token = _require_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    _hub_call(lambda: api.create_repo(repo_id, repo_type=repo_type, exist_ok=True), repo_id,
              repo_type, None, endpoint=endpoint, hint=_WRITE_HINT)
    run_file = _run_path(results)
    payload = {**results, "format": RESULTS_FORMAT,
               "submitted_at": datetime.now(timezone.utc).isoformat()}
    blob = json.dumps(payload, indent=2).encode()
    cache: dict[str, dict[str, Any]] = {}
    for attempt in range(max_attempts):
        head = _hub_call(lambda: api.repo_info(repo_id, repo_type=repo_type, revision="main"),
                         repo_id, repo_type, "main", endpoint=endpoint,
                         hint=_WRITE_HINT).sha
        names = [f for f in _hub_call(lambda h=head: api.list_repo_files(
            repo_id, repo_type=repo_type, revision=h), repo_id, repo_type, head,
            endpoint=endpoint, hint=_WRITE_HINT)
            if f.startswith("runs/") and f.endswith(".json")]
        runs = []
        for name in names:
            if name not in cache:
                local = _hub_call(lambda n=name, h=head: hf_hub_download(
                    repo_id, n, repo_type=repo_type, revision=h, endpoint=endpoint,
                    token=token), repo_id, repo_type, head, name, endpoint, _WRITE_HINT)
                cache[name] = json.loads(Path(local).read_text())
            runs.append((name, cache[name]))
        runs.append((run_file, payload))
        card = results_card(runs, repo_id)
        try:
            api.create_commit(
                repo_id, repo_type=repo_type, parent_commit=head,
                operations=[CommitOperationAdd(run_file, blob),
                            CommitOperationAdd("README.md", str(card).encode())],
                commit_message=f"hf-attrib: add run {run_file}")
            return run_file
        except HfHubHTTPError as err:
            status = getattr(err.response, "status_code", None)
            if status not in (409, 412):
                raise
            time.sleep(min(2.0, 0.1 * 2**attempt) * (0.5 + uuid.uuid4().int % 100 / 100))
    raise HubError(f"{repo_id} kept changing while pushing {run_file} ({max_attempts} attempts):"
                   " try again.")
