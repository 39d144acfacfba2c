"""A local Hugging Face Hub for the tests: olah (reads) behind a front server that takes writes.

``olah`` 0.5.4 in offline mode serves plain git repositories from ``MIRRORS/{models,datasets}/
ORG/NAME`` and answers the real clients' reads (``hf_hub_download``, ``snapshot_download``,
``datasets.load_dataset``) but takes no writes. The front server listens on the one endpoint the
clients use (``HF_ENDPOINT``): GET/HEAD go to olah unchanged; the few POSTs ``huggingface_hub``
2.4 makes to write (``create_repo``, ``validate-yaml``, ``preupload``, ``commit``) are handled
here, committing with the ``git`` CLI into the same repositories olah serves.

Commits are made with git plumbing on a private index (the working tree is never touched) and
the branch is moved with ``git update-ref NEW OLD``, an atomic compare-and-swap: a commit whose
``parentCommit`` is no longer the branch head gets HTTP 412, as on the Hub.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection",
        "te", "trailer", "upgrade"}
_COMMIT_RE = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)/commit/(.+)$")
_PREUPLOAD_RE = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)/preupload/(.+)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
    out = subprocess.run(["git", *args], cwd=repo, input=input, capture_output=True,
                         env={**os.environ, **(env or {})}, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {out.stderr.decode(errors='replace')}")
    return out.stdout.decode().strip()


_GIT_ID = {"GIT_AUTHOR_NAME": "local-hub", "GIT_AUTHOR_EMAIL": "hub@localhost",
           "GIT_COMMITTER_NAME": "local-hub", "GIT_COMMITTER_EMAIL": "hub@localhost"}


class LocalHub:
    """olah + the write front server, on free ports, with a mirrors folder under ``root``.

    Attributes:
        endpoint: the URL clients use (``HF_ENDPOINT``).
        mirrors: folder of the git repositories.
        commits: number of commits the front server made (for assertions).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.commits = 0
        # (method, path, Range header) of every request seen
        self.requests: list[tuple[str, str, str | None]] = []
        # GETs of paths ending with one of these are cut off after half the body, once each
        # (a dropped connection midway through a download).
        self.interrupt: set[str] = set()
        # (method, path, status, body bytes sent) of every proxied read: what really arrived
        self.sent: list[tuple[str, str, int, int]] = []
        # paths of the files of each commit made, in order
        self.committed: list[list[str]] = []
        # when set, only this many more commits succeed; later ones get HTTP 507 (an outage
        # midway through a multi-commit upload)
        self.commits_left: int | None = None
        self._lock = threading.Lock()
        self._olah: subprocess.Popen | None = None
        self._front: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------------------- life cycle
    def start(self) -> LocalHub:
        for kind in ("models", "datasets", "spaces"):
            (self.mirrors / kind).mkdir(parents=True, exist_ok=True)
        self.olah_port, self.port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.olah_port}\n'
            f'repos-path = "{self.root / "olah-repos"}"\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n"
        )
        self._log = open(self.root / "olah.log", "wb")
        self._olah = subprocess.Popen(["olah-cli", "-c", str(config)], cwd=self.root,
                                      stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.olah_port), timeout=0.5):
                    break
            except OSError:
                if self._olah.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("olah did not start: "
                                       + (self.root / "olah.log").read_text()[-2000:]) from None
                time.sleep(0.1)
        hub = self

        class Handler(_Handler):
            local_hub = hub

        self._front = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._front.daemon_threads = True
        threading.Thread(target=self._front.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._front is not None:
            self._front.shutdown()
            self._front.server_close()
            self._front = None
        if self._olah is not None:
            self._olah.terminate()
            try:
                self._olah.wait(10)
            except subprocess.TimeoutExpired:
                self._olah.kill()
                self._olah.wait()
            self._olah = None
            self._log.close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------- git side
    def repo_path(self, repo_type: str, repo_id: str) -> Path:
        return self.mirrors / f"{repo_type}s" / repo_id

    def create_repo(self, repo_type: str, repo_id: str) -> bool:
        """Create an empty repository with one initial commit; False if it exists."""
        path = self.repo_path(repo_type, repo_id)
        with self._lock:
            if path.exists():
                return False
            path.mkdir(parents=True)
            _git(path, "init", "-q", "-b", "main")
            (path / ".gitattributes").write_text("*.safetensors binary\n*.parquet binary\n")
            _git(path, "add", ".gitattributes")
            _git(path, "commit", "-q", "-m", "initial commit", env=_GIT_ID)
        return True

    def head(self, repo_type: str, repo_id: str, branch: str = "main") -> str:
        return _git(self.repo_path(repo_type, repo_id), "rev-parse", f"refs/heads/{branch}")

    def blob_oid(self, path: Path, revision: str, file: str) -> str | None:
        try:
            return _git(path, "rev-parse", f"{revision}:{file}")
        except RuntimeError:
            return None

    def commit(self, repo_type: str, repo_id: str, branch: str, header: dict,
               files: dict[str, bytes], deleted: list[str], deleted_folders: list[str]) -> str:
        """Commit onto ``branch``; raises ``_Conflict`` if ``parentCommit`` is stale."""
        path = self.repo_path(repo_type, repo_id)
        ref = f"refs/heads/{branch}"
        with self._lock:
            if self.commits_left is not None:
                if self.commits_left <= 0:
                    raise _Outage("the local hub is refusing commits (simulated outage)")
                self.commits_left -= 1
        head = _git(path, "rev-parse", ref)
        parent = header.get("parentCommit")
        if parent and parent != head:
            raise _Conflict(f"A commit has happened since {parent}: branch {branch} is at {head}.")
        with tempfile.TemporaryDirectory() as tmp:
            env = {**_GIT_ID, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
            _git(path, "read-tree", head, env=env)
            for name in deleted:
                _git(path, "update-index", "--force-remove", "--", name, env=env)
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                listed = _git(path, "ls-files", "--", prefix, env=env)
                for name in filter(None, listed.splitlines()):
                    _git(path, "update-index", "--force-remove", "--", name, env=env)
            for name, content in files.items():
                oid = _git(path, "hash-object", "-w", "--stdin", input=content)
                _git(path, "update-index", "--add", "--cacheinfo", f"100644,{oid},{name}",
                     env=env)
            tree = _git(path, "write-tree", env=env)
            message = header.get("summary") or "commit"
            if header.get("description"):
                message += "\n\n" + header["description"]
            new = _git(path, "commit-tree", tree, "-p", head, "-m", message, env=env)
        try:  # compare-and-swap: fails if someone else moved the branch meanwhile
            _git(path, "update-ref", ref, new, head)
        except RuntimeError as err:
            raise _Conflict(f"branch {branch} moved during the commit: {err}") from None
        with self._lock:
            self.commits += 1
            self.committed.append(sorted(files))
        return new


class _Conflict(Exception):
    pass


class _Outage(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    local_hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # ------------------------------------------------------------------------- responses
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              head_only: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: object, error_code: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if error_code:
            headers["X-Error-Code"] = error_code
        if status >= 400 and isinstance(payload, dict) and "error" in payload:
            headers["X-Error-Message"] = payload["error"][:200]
        self._send(status, json.dumps(payload).encode(), headers)

    # ------------------------------------------------------------------------- reads: proxy
    def _proxy(self, method: str, body: bytes | None = None) -> None:
        self.local_hub.requests.append((method, self.path, self.headers.get("Range")))
        conn = http.client.HTTPConnection("127.0.0.1", self.local_hub.olah_port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Host"] = f"127.0.0.1:{self.local_hub.port}"
        try:
            conn.request(method, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 401 and method in ("GET", "HEAD"):
                explained = self._explain_401()
                if explained is not None:
                    status, code, message = explained
                    self._send(status, b"" if method == "HEAD" else json.dumps(
                        {"error": message}).encode(),
                        {"X-Error-Code": code, "X-Error-Message": message,
                         "Content-Type": "application/json"}, head_only=method == "HEAD")
                    return
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
            if method == "HEAD":
                self.send_response(resp.status)
                for k, v in out.items():
                    self.send_header(k, v)
                length = resp.getheader("Content-Length")
                self.send_header("Content-Length", length if length is not None else "0")
                self.end_headers()
            elif self._cut(resp.status, body, out):
                self.local_hub.sent.append((method, self.path, resp.status, len(body) // 2))
                return
            else:
                self._send(resp.status, body, out)
                self.local_hub.sent.append((method, self.path, resp.status, len(body)))
        finally:
            conn.close()

    def _cut(self, status: int, body: bytes, headers: dict) -> bool:
        """Send half of ``body`` and drop the connection, if this path is to be interrupted."""
        hub = self.local_hub
        path = unquote(urlsplit(self.path).path)
        with hub._lock:
            match = next((s for s in hub.interrupt if path.endswith(s)), None)
            if match is None or status != 200:
                return False
            hub.interrupt.discard(match)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        time.sleep(0.3)  # let the client take in the first half before the connection drops
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
        return True

    def _explain_401(self) -> tuple[int, str, str] | None:
        """olah answers 401 for a missing repo, revision and file alike; the Hub answers 404
        with an ``X-Error-Code`` saying which. Work out which from the git repositories."""
        path = unquote(urlsplit(self.path).path)
        m = (re.match(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)/(?:revision|tree)/"
                      r"([^/]+)(?:/(.*))?$", path)
             or re.match(r"^/(datasets|spaces)?/?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$", path))
        if m is None:
            return None
        kind = m.group(1) or "models"
        repo_id, revision, file = f"{m.group(2)}/{m.group(3)}", m.group(4), m.group(5)
        repo = self.local_hub.repo_path(kind[:-1], repo_id)
        if not repo.exists():
            return 404, "RepoNotFound", f"Repository {repo_id} not found."
        try:
            _git(repo, "rev-parse", "--verify", f"{revision}^{{commit}}")
        except RuntimeError:
            return 404, "RevisionNotFound", f"Invalid rev id: {revision}"
        if file and "/resolve/" in path:
            return 404, "EntryNotFound", f"Entry not found: {file}"
        return None

    def do_GET(self) -> None:
        self._proxy("GET")

    def do_HEAD(self) -> None:
        self._proxy("HEAD")

    # ------------------------------------------------------------------------- writes
    def do_POST(self) -> None:
        hub = self.local_hub
        hub.requests.append(("POST", self.path, None))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        path = unquote(urlsplit(self.path).path)
        try:
            if path == "/api/repos/create":
                self._create(json.loads(body))
            elif path == "/api/validate-yaml":
                self._json(200, {"warnings": []})
            elif m := _PREUPLOAD_RE.match(path):
                self._preupload(m.group(1)[:-1], f"{m.group(2)}/{m.group(3)}", m.group(4),
                                json.loads(body))
            elif m := _COMMIT_RE.match(path):
                self._commit(m.group(1)[:-1], f"{m.group(2)}/{m.group(3)}", m.group(4), body)
            else:  # other POSTs (e.g. paths-info) are reads: olah answers them
                self.local_hub.requests.pop()
                self._proxy("POST", body)
        except Exception as err:  # a broken request must answer, not hang the client
            self._json(500, {"error": f"local hub: {type(err).__name__}: {err}"})

    def _create(self, payload: dict) -> None:
        repo_type = payload.get("type") or "model"
        org = payload.get("organization")
        if not org:
            self._json(400, {"error": "the local hub needs repo ids of the form org/name"})
            return
        repo_id = f"{org}/{payload['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.local_hub.endpoint}/{prefix}{repo_id}"
        if self.local_hub.create_repo(repo_type, repo_id):
            self._json(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex})
        else:
            self._json(409, {"error": "You already created this repo", "url": url})

    def _check_repo(self, repo_type: str, repo_id: str, revision: str) -> Path | None:
        path = self.local_hub.repo_path(repo_type, repo_id)
        if not path.exists():
            self._json(404, {"error": f"Repository {repo_id} not found"}, "RepoNotFound")
            return None
        try:
            _git(path, "rev-parse", "--verify", f"refs/heads/{revision}")
        except RuntimeError:
            self._json(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
            return None
        return path

    def _preupload(self, repo_type: str, repo_id: str, revision: str, payload: dict) -> None:
        path = self._check_repo(repo_type, repo_id, revision)
        if path is None:
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": self.local_hub.blob_oid(path, revision, f["path"])}
                 for f in payload.get("files", [])]
        self._json(200, {"files": files, "commitOid": self.local_hub.head(repo_type, repo_id,
                                                                         revision)})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        if self._check_repo(repo_type, repo_id, revision) is None:
            return
        header: dict = {}
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        deleted_folders: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise ValueError(f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key == "deletedFolder":
                deleted_folders.append(value["path"])
            else:  # lfsFile: preupload never asks for LFS, so a client sending it is a bug
                self._json(400, {"error": f"the local hub takes no {key!r} operations"})
                return
        try:
            oid = self.local_hub.commit(repo_type, repo_id, revision, header, files, deleted,
                                        deleted_folders)
        except _Conflict as err:
            self._json(412, {"error": str(err)})
            return
        except _Outage as err:  # 507: not one of the statuses the client retries
            self._json(507, {"error": str(err)})
            return
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._json(200, {"success": True, "commitOid": oid, "pullRequestUrl": None,
                         "commitUrl": f"{self.local_hub.endpoint}/{prefix}{repo_id}/commit/{oid}"})


@contextlib.contextmanager
def local_hub(root: str | Path):
    hub = LocalHub(root).start()
    try:
        yield hub
    finally:
        hub.stop()
