"""A local stand-in for the Hugging Face Hub, for pull tests that need no network.

It speaks the part of the Hub's HTTP API that the real ``huggingface_hub`` client uses to find
and download a model repository, so pulls are tested end to end against real files:

* ``GET /api/models/{repo}[/revision/{rev}]``: repo info (``id``, ``sha``, ``siblings``; with
  ``?blobs=true`` the siblings carry sizes and LFS info, as ``model_info(files_metadata=True)`` asks);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...``: the file listing;
* ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: file metadata and bytes, ``Range`` honoured.

and the part ``HfApi.create_repo``, ``create_branch`` and ``create_commit`` use to upload, over
plain LFS (the client uses Xet only when ``hf_xet`` is installed and ``HF_HUB_DISABLE_XET`` is
unset, whatever the server says: :func:`isolate_hf_client` sets it):

* ``POST /api/repos/create`` and ``POST /api/models/{repo}/branch/{branch}``;
* ``POST /api/models/{repo}/preupload/{rev}``: which files go through LFS (the rule that
  :meth:`HubStandin.add_repo` uses) and the oid of any file already there;
* ``POST /{repo}.git/info/lfs/objects/batch``: an upload URL per object not held yet, which
  ``PUT`` fills (it asks for no token, as a presigned URL does not), then
  ``POST /{repo}.git/info/lfs/objects/verify``;
* ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit (a header, then ``file`` with
  base64 content, ``lfsFile`` naming an uploaded object, ``deletedFile``), made a new commit of
  the branch whose files the download endpoints above then serve.

Every upload endpoint but the presigned ``PUT`` asks for ``Authorization: Bearer <token>`` of a
writer the test declares (:meth:`HubStandin.add_writer`): no token or an unknown one is a 401
("Invalid credentials in Authorization header", as the Hub says), a token of someone else's
namespace a 403, so a test proves which token the client sent.

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

import base64
import hashlib
import json
import re
import secrets
import shutil
import socket
import sys
import tempfile
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
_CREATE_REPO = re.compile(r"^/api/repos/create$")
_BRANCH = re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$")
_PREUPLOAD = re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")
_LFS_BATCH = re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")
_LFS_VERIFY = re.compile(rf"^/{_REPO}\.git/info/lfs/objects/verify$")
_LFS_UPLOAD = re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")
NO_CREDENTIALS = "Invalid credentials in Authorization header"


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
        # act while a download is under way (join it, kill the puller); uploads are taken in
        # at the same pace, so that their progress shows.
        self.bytes_per_s: float | None = None
        # Uploads: who may write where, what was uploaded (content by sha256, in a folder that
        # lives as long as the server), and the upload URLs handed out (signature -> oid).
        self._writers: dict[str, set[str]] = {}
        self._blob_dir: Path | None = None
        self._blobs: dict[str, Path] = {}
        self._upload_grants: dict[str, str] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> HubStandin:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.standin = self
        self._blob_dir = Path(tempfile.mkdtemp(prefix="hub-standin-"))
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
        if self._blob_dir is not None:
            shutil.rmtree(self._blob_dir, ignore_errors=True)
            self._blob_dir = None

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

    def add_writer(self, token: str, namespace: str) -> None:
        """Let ``Authorization: Bearer <token>`` create and write repos under ``namespace``
        (a user or an organization; repos added with :meth:`add_repo` belong to theirs)."""
        with self._lock:
            self._writers.setdefault(token, set()).add(namespace.lower())

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of ``repo_id`` at ``revision`` (what a push left there)."""
        repo = self._repo(repo_id)
        sha = repo.resolve(revision) if repo is not None else None
        if repo is None or sha is None:
            raise KeyError(f"{repo_id} has no revision {revision!r}")
        return {path: f.source.read_bytes() for path, f in repo.commits[sha].items() if f.source is not None}

    # -- uploads (called by the handler) ---------------------------------------------------

    def _namespaces_of(self, token: str | None) -> set[str] | None:
        with self._lock:
            return None if token is None else self._writers.get(token)

    def _create_repo(self, repo_id: str) -> bool:
        """A new repo with one empty commit on ``main``; False if it exists (in any case)."""
        with self._lock:
            if self._find(repo_id) is not None:
                return False
            sha = hashlib.sha1(f"{repo_id}\ninitial commit".encode()).hexdigest()
            self._repos[repo_id] = HubRepo(repo_id, gated=False, branches={"main": sha}, commits={sha: {}})
            return True

    def _create_branch(self, repo: HubRepo, branch: str, start: str) -> bool:
        with self._lock:
            if branch in repo.branches:
                return False
            repo.branches[branch] = start
            return True

    def _blob(self, oid: str) -> Path | None:
        with self._lock:
            return self._blobs.get(oid)

    def _grant_upload(self, oid: str) -> str:
        signature = secrets.token_hex(16)
        with self._lock:
            self._upload_grants[signature] = oid
        return signature

    def _granted(self, signature: str, oid: str) -> bool:
        with self._lock:
            return self._upload_grants.get(signature) == oid

    def _store_blob(self, chunks: Any) -> tuple[str, int]:
        """Write uploaded content to the blob folder; its sha256 and size."""
        assert self._blob_dir is not None
        partial = self._blob_dir / f"partial-{secrets.token_hex(8)}"
        digest, size = hashlib.sha256(), 0
        with partial.open("wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
                if self.bytes_per_s:
                    time.sleep(len(chunk) / self.bytes_per_s)
        oid = digest.hexdigest()
        target = self._blob_dir / oid
        partial.replace(target)
        with self._lock:
            self._blobs[oid] = target
        return oid, size

    def _commit(self, repo: HubRepo, branch: str, summary: str, files: dict[str, HubFile]) -> str:
        with self._lock:
            parent = repo.branches[branch]
            listing = "\n".join(f"{f.path} {f.git_oid}" for f in sorted(files.values(), key=lambda f: f.path))
            sha = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{summary}\n{listing}".encode()).hexdigest()
            repo.commits[sha] = files
            repo.branches[branch] = sha
            return sha

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
            return self._find(repo_id)

    def _find(self, repo_id: str) -> HubRepo | None:
        """:meth:`_repo` for a caller holding the lock."""
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
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None,
                 **body: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.commit = commit
        self.body = body  # more of the JSON body than its "error"


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

    def do_POST(self) -> None:
        self._dispatch_upload("POST")

    def do_PUT(self) -> None:
        self._dispatch_upload("PUT")

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

    def _dispatch_upload(self, method: str) -> None:
        url = urlsplit(self.path)
        self.standin._record(method, unquote(url.path), None)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if method == "PUT" and (match := _LFS_UPLOAD.match(url.path)):
                self._lfs_upload(match, query)
                return
            body = b"".join(self._body_chunks())  # read whole first: an early answer must not leave it unread
            if method != "POST":
                raise _HubError(405, None, "Method Not Allowed")
            if _CREATE_REPO.match(url.path):
                self._create_repo(body)
            elif match := _BRANCH.match(url.path):
                self._create_branch(match, body)
            elif match := _PREUPLOAD.match(url.path):
                self._preupload(match, body)
            elif match := _LFS_BATCH.match(url.path):
                self._lfs_batch(match, body)
            elif match := _LFS_VERIFY.match(url.path):
                self._lfs_verify(match, body)
            elif match := _COMMIT.match(url.path):
                self._commit(match, body)
            else:
                raise _HubError(404, None, "Not Found")
        except _HubError as err:
            self._send_error(method, err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _body_chunks(self) -> Any:
        """The request body, as it arrives: with a Content-Length, or chunked (how the client
        streams a file object)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                while size > 0:
                    chunk = self.rfile.read(min(size, STREAM_CHUNK))
                    if not chunk:
                        return
                    size -= len(chunk)
                    yield chunk
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, STREAM_CHUNK))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    # -- access checks ---------------------------------------------------------------------

    def _writer(self, namespace: str, what: str) -> None:
        """The request's bearer token may write under ``namespace``; else 401 or 403."""
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        namespaces = self.standin._namespaces_of(token)
        if namespaces is None:
            raise _HubError(401, None, NO_CREDENTIALS)
        if namespace.lower() not in namespaces:
            raise _HubError(403, None, f"You don't have the rights to {what}")

    def _writable(self, repo_id: str) -> HubRepo:
        namespace = repo_id.split("/")[0]
        self._writer(namespace, f"write to {repo_id}")
        repo = self.standin._repo(repo_id)
        if repo is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        return repo

    def _branch(self, repo: HubRepo, revision: str) -> str:
        """Commits go to branches only, as on the Hub."""
        if revision not in repo.branches:
            raise _HubError(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return repo.branches[revision]

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

    # -- upload endpoints ------------------------------------------------------------------

    def _create_repo(self, body: bytes) -> None:
        payload = _json_body(body)
        name, namespace = payload.get("name"), payload.get("organization")
        if not isinstance(name, str) or not isinstance(namespace, str):
            raise _HubError(400, None, "name and organization are required")
        repo_id = f"{namespace}/{name}"
        self._writer(namespace, f'create a model under the namespace "{namespace}"')
        if not self.standin._create_repo(repo_id):
            # The client reads the url from this answer too (create_repo with exist_ok).
            raise _HubError(409, None, "You already created this model repo",
                            url=f"{self.standin.endpoint}/{repo_id}")
        self._send_json({"url": f"{self.standin.endpoint}/{repo_id}", "name": repo_id})

    def _create_branch(self, match: re.Match[str], body: bytes) -> None:
        repo = self._writable(unquote(match["repo"]))
        start = _json_body(body).get("startingPoint") or "main"
        sha = repo.resolve(start)
        if sha is None:
            raise _HubError(404, "RevisionNotFound", "Invalid rev id: " + start)
        if not self.standin._create_branch(repo, unquote(match["rev"]), sha):
            raise _HubError(409, None, "Reference already exists")
        self._send_json({})

    def _preupload(self, match: re.Match[str], body: bytes) -> None:
        repo = self._writable(unquote(match["repo"]))
        sha = self._branch(repo, unquote(match["rev"]))
        current = repo.commits[sha]
        answers = []
        for entry in _json_body(body).get("files", []):
            path, size = entry["path"], int(entry["size"])
            lfs = _is_lfs(path, size)
            held = current.get(path)
            oid = None
            if held is not None:
                oid = held.sha256 if lfs else (held.git_oid if held.sha256 is None else None)
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        self._send_json({"files": answers, "commitOid": sha})

    def _lfs_batch(self, match: re.Match[str], body: bytes) -> None:
        repo_id = unquote(match["repo"])
        self._writable(repo_id)
        payload = _json_body(body)
        if payload.get("operation") != "upload":
            raise _HubError(400, None, "only uploads are supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size}
            held = self.standin._blob(oid)
            if held is None or held.stat().st_size != size:  # else already there: nothing to upload
                signature = self.standin._grant_upload(oid)
                answer["authenticated"] = True
                answer["actions"] = {
                    "upload": {"href": f"{self.standin.endpoint}/lfs-upload/{oid}?sig={signature}"},
                    "verify": {"href": f"{self.standin.endpoint}/{repo_id}.git/info/lfs/objects/verify",
                               "header": {}},
                }
            objects.append(answer)
        self._send_json({"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")

    def _lfs_upload(self, match: re.Match[str], query: dict[str, str]) -> None:
        """The presigned upload URL: its signature, not a token, says who may use it."""
        oid = match["oid"]
        chunks = self._body_chunks()
        if not self.standin._granted(query.get("sig", ""), oid):
            for _ in chunks:
                pass
            raise _HubError(403, None, "Request has expired or its signature does not match")
        received, _ = self.standin._store_blob(chunks)
        if received != oid:
            raise _HubError(400, None, f"content does not match its oid {oid}")
        self._send_head(200, {"ETag": f'"{oid}"'}, 0)

    def _lfs_verify(self, match: re.Match[str], body: bytes) -> None:
        self._writable(unquote(match["repo"]))
        payload = _json_body(body)
        held = self.standin._blob(str(payload.get("oid")))
        if held is None or held.stat().st_size != payload.get("size"):
            raise _HubError(404, None, "Object not found")
        self._send_json({"message": "Object verified"})

    def _commit(self, match: re.Match[str], body: bytes) -> None:
        repo = self._writable(unquote(match["repo"]))
        branch = unquote(match["rev"])
        sha = self._branch(repo, branch)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, None, "the commit must start with a header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, sha):
            raise _HubError(412, None, "A commit has happened since; pull and try again")
        files = dict(repo.commits[sha])
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                data = base64.b64decode(value["content"])
                digest, size = self.standin._store_blob([data])
                files[path] = HubFile(path, size, git_blob_oid(data), None, self.standin._blob(digest))
            elif key == "lfsFile":
                blob = self.standin._blob(value["oid"])
                if blob is None:
                    raise _HubError(422, None, f"{path}: LFS object {value['oid']} was never uploaded")
                files[path] = HubFile(path, blob.stat().st_size, _git_oid_of(blob), value["oid"], blob)
            elif key == "deletedFile":
                files.pop(path, None)
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(path.rstrip("/") + "/")}
            else:
                raise _HubError(400, None, f"unknown commit operation {key!r}")
        commit = self.standin._commit(repo, branch, header.get("summary", ""), files)
        self._send_json({"commitUrl": f"{self.standin.endpoint}/{repo.repo_id}/commit/{commit}",
                         "commitOid": commit, "success": True, "pullRequestUrl": None})

    # -- responses -------------------------------------------------------------------------

    def _send_head(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_json(self, body: Any, content_type: str = "application/json; charset=utf-8") -> None:
        data = json.dumps(body).encode()
        self._send_head(200, {"Content-Type": content_type}, len(data))
        self.wfile.write(data)

    def _send_error(self, method: str, err: _HubError) -> None:
        data = json.dumps({"error": err.message, **err.body}).encode()
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


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        raise _HubError(400, None, "the body is not JSON") from None
    if not isinstance(payload, dict):
        raise _HubError(400, None, "the body must be a JSON object")
    return payload


def _git_oid_of(path: Path) -> str:
    """:func:`git_blob_oid` of a file, read in chunks."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as fh:
        while chunk := fh.read(STREAM_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
