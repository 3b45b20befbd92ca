"""A local stand-in for the Hugging Face Hub, for pull tests that need no network.

It speaks the part of the Hub's HTTP API that the real ``huggingface_hub`` client uses to find
and download a model repository, so pulls are tested end to end against real files:

* ``GET /api/models/{repo}[/revision/{rev}]``: repo info (``id``, ``sha``, ``siblings``; with
  ``?blobs=true`` the siblings carry sizes and LFS info, as ``model_info(files_metadata=True)`` asks);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...``: the file listing;
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: file metadata and bytes, ``Range`` honoured.

Repo ids match whatever their case, and the repo's info gives its own spelling, as the Hub
does. The client decides which exception to raise from the ``X-Error-Code`` header, so errors carry
it exactly as the Hub does (``RepoNotFound``, ``GatedRepo``, ``EntryNotFound``,
``RevisionNotFound``). Large files are served as LFS files (their ETag is the sha256 of the
content), directly rather than through a redirect to a CDN.

Tests can declare files that are never served (:meth:`HubStandin.add_virtual_file`), cut a
download short once (:meth:`HubStandin.cut_once`) and inspect every request made
(:attr:`HubStandin.requests`).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
LFS_MIN_SIZE = 1024 * 1024
LFS_POINTER_SIZE = 134
STREAM_CHUNK = 1024 * 1024
LAST_MODIFIED = "2024-01-01T00:00:00.000Z"

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_API_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_API_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class HubFile:
    """One file of a repo. ``source`` is None for a virtual file, which is listed but never served."""

    path: str
    size: int
    git_oid: str
    sha256: str | None  # set for LFS files
    source: Path | None

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag: the LFS object id for LFS files, the git blob id otherwise."""
        return self.sha256 or self.git_oid

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": self.size, "path": self.path}
        if self.sha256 is not None:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": LFS_POINTER_SIZE}
        return entry

    def sibling(self, with_blobs: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": self.path}
        if with_blobs:
            entry["size"] = self.size
            entry["blobId"] = self.git_oid
            if self.sha256 is not None:
                entry["lfs"] = {"size": self.size, "sha256": self.sha256, "pointerSize": LFS_POINTER_SIZE}
        return entry


@dataclass
class HubRepo:
    repo_id: str
    gated: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)  # sha -> path -> file

    def resolve(self, revision: str) -> str | None:
        """The commit a revision names: a branch, or a full commit sha of this repo."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


def git_blob_oid(data: bytes) -> str:
    """The id git gives a blob, which the Hub reports as a file's ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE


class HubStandin:
    """An in-process HTTP server impersonating the Hub for the ``huggingface_hub`` client.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. Point the client at
    :attr:`endpoint` with ``endpoint=`` (``HF_ENDPOINT`` is read when ``huggingface_hub`` is
    imported, too early for a test to set it).
    """

    token = "hf_standin_token_for_gated_repos"

    def __init__(self) -> None:
        self._repos: dict[str, HubRepo] = {}
        self._cuts: dict[tuple[str, str], int] = {}
        self._fail_resume: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._requests: list[tuple[str, str, str | None]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Serve file bytes at most this fast (None: as fast as possible), so that tests can
        # act while a download is under way (join it, kill the puller).
        self.bytes_per_s: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> HubStandin:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.standin = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("HubStandin is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- content ---------------------------------------------------------------------------

    def add_repo(self, repo_id: str, directory: Path, *, gated: bool = False, revision: str = "main") -> str:
        """Publish the files under ``directory`` (recursively, paths relative to it) as ``revision``
        of ``repo_id`` and return the commit sha. Content is hashed now and read again when
        served, so the directory must stay unchanged while the stand-in runs."""
        directory = Path(directory)
        files: dict[str, HubFile] = {}
        for source in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = source.relative_to(directory).as_posix()
            data = source.read_bytes()
            sha256 = hashlib.sha256(data).hexdigest() if _is_lfs(rel, len(data)) else None
            files[rel] = HubFile(rel, len(data), git_blob_oid(data), sha256, source)
        listing = "\n".join(f"{f.path} {f.git_oid}" for f in files.values())
        sha = hashlib.sha1(f"{repo_id}\n{revision}\n{listing}".encode()).hexdigest()
        with self._lock:
            repo = self._repos.setdefault(repo_id, HubRepo(repo_id, gated))
            repo.gated = gated
            repo.branches[revision] = sha
            repo.commits[sha] = files
        return sha

    def add_virtual_file(self, repo_id: str, path: str, size: int, *, revision: str = "main") -> None:
        """List an LFS file of ``size`` bytes in the repo's tree without any content behind it:
        HEAD answers with its metadata, GET fails. For tests of pulls that must refuse to start,
        such as a model larger than the free disk space."""
        fake_oid = hashlib.sha256(f"{repo_id}/{path}:{size}".encode()).hexdigest()
        with self._lock:
            repo = self._repos[repo_id]
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            repo.commits[sha][path] = HubFile(path, size, fake_oid[:40], fake_oid, None)

    def cut_once(self, repo_id: str, path: str, after_bytes: int, *, then_fail: bool = False) -> None:
        """Make the next GET of ``path`` without a ``Range`` header promise the whole file, send
        ``after_bytes`` bytes and drop the connection, as a flaky network would. ``then_fail``:
        the client's attempt to resume (a GET with ``Range``) gets a 500, so the download fails
        with part of the file written."""
        with self._lock:
            self._cuts[(repo_id, path)] = after_bytes
            if then_fail:
                self._fail_resume.add((repo_id, path))

    # -- request log -----------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        """A snapshot of ``(method, unquoted path without query, Range header or None)`` for every
        request served so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def count(self, method: str, path_suffix: str) -> int:
        """How many ``method`` requests were made for a path ending in ``path_suffix``."""
        return sum(1 for m, p, _ in self.requests if m == method and p.endswith(path_suffix))

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self._requests.append((method, path, range_header))

    def _take_cut(self, repo_id: str, path: str) -> int | None:
        with self._lock:
            return self._cuts.pop((repo_id, path), None)

    def _take_resume_failure(self, repo_id: str, path: str) -> bool:
        with self._lock:
            if (repo_id, path) in self._fail_resume:
                self._fail_resume.discard((repo_id, path))
                return True
            return False

    def _repo(self, repo_id: str) -> HubRepo | None:
        """As on the Hub, a repo id matches whatever its case (``QWEN/x`` is ``Qwen/x``); the
        repo's info then answers with the spelling it was created with."""
        with self._lock:
            if (repo := self._repos.get(repo_id)) is not None:
                return repo
            return next((r for key, r in self._repos.items() if key.lower() == repo_id.lower()), None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: HubStandin

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Drop kept-alive client connections so their handler threads end with the server."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-response are expected in these tests: stay quiet about those,
        but keep reporting real failures of the stand-in."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.commit = commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """No request logging: tests read :attr:`HubStandin.requests` instead."""

    @property
    def standin(self) -> HubStandin:
        return self.server.standin

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        range_header = self.headers.get("Range")
        self.standin._record(method, unquote(url.path), range_header)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if match := _RESOLVE.match(url.path):
                self._resolve(method, match, range_header)
            elif method == "GET" and (match := _API_TREE.match(url.path)):
                self._tree(match, query)
            elif method == "GET" and (match := _API_INFO.match(url.path)):
                self._info(match, query)
            else:
                raise _HubError(404, None, "Not Found")
        except _HubError as err:
            self._send_error(method, err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- access checks ---------------------------------------------------------------------

    def _lookup(self, repo_id: str, revision: str) -> tuple[HubRepo, str]:
        repo = self.standin._repo(repo_id)
        if repo is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        if repo.gated:
            auth = self.headers.get("Authorization")
            if auth is None:
                raise _HubError(401, "GatedRepo", "Access to this model is restricted. You must be authenticated.")
            if auth != f"Bearer {HubStandin.token}":
                raise _HubError(403, "GatedRepo", "Access to this model is restricted and you are not in the authorized list.")
        sha = repo.resolve(revision)
        if sha is None:
            raise _HubError(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return repo, sha

    # -- endpoints -------------------------------------------------------------------------

    def _info(self, match: re.Match[str], query: dict[str, str]) -> None:
        repo_id = unquote(match["repo"])
        revision = unquote(match["rev"]) if match["rev"] else "main"
        repo, sha = self._lookup(repo_id, revision)
        files = repo.commits[sha].values()
        with_blobs = query.get("blobs", "").lower() == "true"
        repo_id = repo.repo_id  # the Hub's own spelling, whatever case was asked
        body = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": sha,
            "lastModified": LAST_MODIFIED,
            "createdAt": LAST_MODIFIED,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "library_name": "transformers",
            "siblings": [f.sibling(with_blobs) for f in files],
        }
        if with_blobs:
            body["usedStorage"] = sum(f.size for f in files)
        self._send_json(body)

    def _tree(self, match: re.Match[str], query: dict[str, str]) -> None:
        repo_id = unquote(match["repo"])
        repo, sha = self._lookup(repo_id, unquote(match["rev"]))
        base = unquote(match["path"] or "").strip("/")
        recursive = query.get("recursive", "").lower() == "true"
        files = repo.commits[sha]
        prefix = f"{base}/" if base else ""
        if base and base not in _directories(files) and base not in files:
            raise _HubError(404, "EntryNotFound", f"{base} does not exist on {sha}", commit=sha)
        entries: list[dict[str, Any]] = []
        for directory in sorted(_directories(files)):
            if directory.startswith(prefix) and (recursive or "/" not in directory[len(prefix):]):
                oid = hashlib.sha1(f"{sha}:{directory}".encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": directory})
        for path, hub_file in files.items():
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix):]):
                entries.append(hub_file.tree_entry())
        self._send_json(entries)

    def _resolve(self, method: str, match: re.Match[str], range_header: str | None) -> None:
        repo_id = unquote(match["repo"])
        path = unquote(match["path"])
        repo, sha = self._lookup(repo_id, unquote(match["rev"]))
        hub_file = repo.commits[sha].get(path)
        if hub_file is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {sha}", commit=sha)

        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{hub_file.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if hub_file.sha256 is not None:
            headers["X-Linked-Etag"] = f'"{hub_file.sha256}"'
            headers["X-Linked-Size"] = str(hub_file.size)
        if method == "HEAD":
            self._send_head(200, headers, hub_file.size)
            return
        if hub_file.source is None:
            raise _HubError(500, None, "virtual file: listed, never served", commit=sha)

        start, end = 0, hub_file.size - 1
        status = 200
        if range_header is not None and self.standin._take_resume_failure(repo.repo_id, path):
            raise _HubError(500, None, "resume refused (cut_once then_fail)", commit=sha)
        if range_header is not None:
            parsed = _parse_range(range_header, hub_file.size)
            if parsed is None:
                headers["Content-Range"] = f"bytes */{hub_file.size}"
                self._send_head(416, headers, 0)
                return
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{hub_file.size}"
        length = end - start + 1
        cut = self.standin._take_cut(repo.repo_id, path) if range_header is None else None
        self._send_head(status, headers, length)
        to_send = length if cut is None else min(cut, length)
        with hub_file.source.open("rb") as fh:
            fh.seek(start)
            while to_send > 0:
                chunk = fh.read(min(STREAM_CHUNK, to_send))
                if not chunk:
                    break
                self.wfile.write(chunk)
                to_send -= len(chunk)
                if self.standin.bytes_per_s:
                    time.sleep(len(chunk) / self.standin.bytes_per_s)
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    # -- responses -------------------------------------------------------------------------

    def _send_head(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_json(self, body: Any) -> None:
        data = json.dumps(body).encode()
        self._send_head(200, {"Content-Type": "application/json; charset=utf-8"}, len(data))
        self.wfile.write(data)

    def _send_error(self, method: str, err: _HubError) -> None:
        data = json.dumps({"error": err.message}).encode()
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": err.message}
        if err.code is not None:
            headers["X-Error-Code"] = err.code
        if err.commit is not None:
            headers["X-Repo-Commit"] = err.commit
        self._send_head(err.status, headers, len(data))
        if method != "HEAD":
            self.wfile.write(data)


def _directories(files: dict[str, HubFile]) -> set[str]:
    """Every folder that holds a file, at any depth: the Hub lists them as tree entries too."""
    found: set[str] = set()
    for path in files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            found.add("/".join(parts[:i]))
    return found


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=N-``, ``bytes=N-M`` or ``bytes=-K`` as an inclusive (start, end), or None when
    unsatisfiable. Multiple ranges are not supported (the client never asks for them)."""
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:
        start, end = max(size - int(m[2]), 0), size - 1
    else:
        start = int(m[1])
        end = min(int(m[2]), size - 1) if m[2] else size - 1
    if start >= size or start > end:
        return None
    return start, end


def isolate_hf_client(monkeypatch: Any, home: Path) -> None:
    """Keep the huggingface_hub client in this process away from any real account and cache.
    The constants are patched as well as the variables because ``huggingface_hub`` reads them
    when imported."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
