"""The Hub stand-in, checked with the real ``huggingface_hub`` client.

Pull tests trust the stand-in to behave like the Hub; these tests make sure it does, for what
those tests rely on: repo info, tree listing, byte-identical downloads of a sharded model, cache
hits without requests, resumption of a cut download with ``Range``, and the errors the client
derives from ``X-Error-Code``; and for pushes, uploads (a repo, a branch, one commit over LFS)
that the download endpoints then serve, only with a writer's token. No network, no GPU.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from tests.hub_standin import HubStandin, git_blob_oid, isolate_hf_client
from tests.model_factory import embedding_bytes, make_tiny_llama

REPO = "tiny-org/tiny-llama"
GATED = "tiny-org/tiny-llama-gated"
TEN_MIB = 10 * 1024 * 1024


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(".safetensors") or len(data) > 2**20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-shard tiny Llama plus a file in a subfolder, so nested paths are served too."""
    target = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", max_shard_bytes=embedding_bytes() + 2**20)
    (target / "original").mkdir()
    (target / "original" / "params.json").write_text('{"dim": 64}\n')
    return target


@pytest.fixture(scope="module")
def source(model_dir: Path) -> dict[str, bytes]:
    return _files(model_dir)


@pytest.fixture(autouse=True)
def hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    home = tmp_path / "hf_home"
    isolate_hf_client(monkeypatch, home)
    return home


@pytest.fixture
def hub() -> Iterator[HubStandin]:
    with HubStandin() as standin:
        yield standin


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_model_dir_is_sharded_with_a_big_shard(source: dict[str, bytes]) -> None:
    shards = [p for p in source if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", p)]
    assert len(shards) >= 2
    assert "model.safetensors.index.json" in source
    assert max(len(source[s]) for s in shards) > TEN_MIB
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(source)
    assert b"chat_template" in source["tokenizer_config.json"]


def test_model_info_and_tree(hub: HubStandin, model_dir: Path, source: dict[str, bytes]) -> None:
    sha = hub.add_repo(REPO, model_dir)
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    api = HfApi(endpoint=hub.endpoint)

    info = api.model_info(REPO, revision="main")
    assert info.id == REPO
    assert info.sha == sha
    assert sorted(s.rfilename for s in info.siblings or []) == sorted(source)
    detailed = api.model_info(REPO, files_metadata=True)
    assert detailed.sha == sha
    assert {s.rfilename: s.size for s in detailed.siblings or []} == {p: len(d) for p, d in source.items()}

    tree = list(api.list_repo_tree(REPO, revision=sha, recursive=True))
    files = {e.path: e for e in tree if isinstance(e, RepoFile)}
    assert [e.path for e in tree if isinstance(e, RepoFolder)] == ["original"]
    assert sorted(files) == sorted(source)
    for path, data in source.items():
        entry = files[path]
        assert entry.size == len(data)
        assert entry.blob_id == git_blob_oid(data)
        if _is_lfs(path, data):
            assert entry.lfs is not None, path
            assert entry.lfs.sha256 == hashlib.sha256(data).hexdigest()
            assert entry.lfs.size == len(data)
        else:
            assert entry.lfs is None, path
    assert files["tokenizer.json"].lfs is not None  # 3.5 MB
    assert sorted(e.path for e in api.list_repo_tree(REPO, revision="main")) == sorted(
        ["original", *(p for p in source if "/" not in p)]
    )
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="original", revision="main")] == [
        "original/params.json"
    ]


def test_every_file_downloads_byte_identical(hub: HubStandin, model_dir: Path, source: dict[str, bytes],
                                             cache: Path) -> None:
    sha = hub.add_repo(REPO, model_dir)
    for path, data in source.items():
        local = hf_hub_download(REPO, path, revision=sha, cache_dir=cache, endpoint=hub.endpoint)
        assert Path(local).read_bytes() == data, path
        assert hub.count("GET", f"/resolve/{sha}/{path}") == 1
        assert hub.count("HEAD", f"/resolve/{sha}/{path}") == 1
        meta = get_hf_file_metadata(hf_hub_url(REPO, path, revision=sha, endpoint=hub.endpoint))
        assert (meta.commit_hash, meta.size) == (sha, len(data))
        assert meta.etag == (hashlib.sha256(data).hexdigest() if _is_lfs(path, data) else git_blob_oid(data))

    hub.clear_requests()
    for path, data in source.items():
        local = hf_hub_download(REPO, path, revision=sha, cache_dir=cache, endpoint=hub.endpoint)
        assert Path(local).read_bytes() == data
    assert hub.requests == []


def test_snapshot_download_then_cache_hit(hub: HubStandin, model_dir: Path, source: dict[str, bytes],
                                          cache: Path) -> None:
    sha = hub.add_repo(REPO, model_dir)
    snapshot = Path(snapshot_download(REPO, revision="main", cache_dir=cache, endpoint=hub.endpoint))
    assert snapshot.name == sha
    assert _files(snapshot) == source

    hub.clear_requests()
    again = Path(snapshot_download(REPO, revision="main", cache_dir=cache, endpoint=hub.endpoint))
    assert again == snapshot
    assert not any("/resolve/" in path for _, path, _ in hub.requests)
    assert hub.requests == [("GET", f"/api/models/{REPO}/revision/main", None)]


def test_cut_download_resumes_with_range(hub: HubStandin, model_dir: Path, source: dict[str, bytes],
                                         cache: Path) -> None:
    sha = hub.add_repo(REPO, model_dir)
    big = max((p for p in source if p.endswith(".safetensors")), key=lambda p: len(source[p]))
    size = len(source[big])
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    assert size > chunk, "a resumable download needs a file larger than the client's download chunk"
    hub.cut_once(REPO, big, after_bytes=chunk + (size - chunk) // 2)

    local = hf_hub_download(REPO, big, revision=sha, cache_dir=cache, endpoint=hub.endpoint)

    assert Path(local).read_bytes() == source[big]
    gets = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith(big)]
    assert gets == [None, f"bytes={chunk}-"]


def test_range_requests_get_partial_content(hub: HubStandin, model_dir: Path, source: dict[str, bytes]) -> None:
    """The client rewinds and still succeeds when a server ignores ``Range``, so a download test
    alone would not notice; ask directly."""
    sha = hub.add_repo(REPO, model_dir)
    path = "model.safetensors.index.json"
    data = source[path]
    url = hf_hub_url(REPO, path, revision=sha, endpoint=hub.endpoint)
    with httpx.Client() as client:
        tail = client.get(url, headers={"Range": "bytes=100-"})
        assert tail.status_code == 206
        assert tail.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
        assert tail.content == data[100:]
        head = client.get(url, headers={"Range": "bytes=0-9"})
        assert (head.status_code, head.content) == (206, data[:10])
        assert client.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
        whole = client.get(url)
        assert (whole.status_code, whole.content) == (200, data)


def test_gated_repo_needs_the_token(hub: HubStandin, model_dir: Path, source: dict[str, bytes],
                                    cache: Path) -> None:
    sha = hub.add_repo(GATED, model_dir, gated=True)
    api = HfApi(endpoint=hub.endpoint)

    with pytest.raises(GatedRepoError):
        hf_hub_download(GATED, "config.json", revision=sha, cache_dir=cache, endpoint=hub.endpoint)
    with pytest.raises(GatedRepoError):
        api.model_info(GATED)
    with pytest.raises(GatedRepoError):
        hf_hub_download(GATED, "config.json", cache_dir=cache, endpoint=hub.endpoint, token="hf_wrong")

    assert api.model_info(GATED, token=HubStandin.token).sha == sha
    for path in ("config.json", "model.safetensors.index.json"):
        local = hf_hub_download(GATED, path, revision=sha, cache_dir=cache, endpoint=hub.endpoint,
                                token=HubStandin.token)
        assert Path(local).read_bytes() == source[path]


def test_missing_repo_revision_and_file(hub: HubStandin, model_dir: Path, cache: Path) -> None:
    sha = hub.add_repo(REPO, model_dir)
    api = HfApi(endpoint=hub.endpoint)

    with pytest.raises(RepositoryNotFoundError) as err:
        hf_hub_download("nobody/nothing", "config.json", cache_dir=cache, endpoint=hub.endpoint)
    assert not isinstance(err.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("nobody/nothing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="no-such-branch", cache_dir=cache, endpoint=hub.endpoint)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "no-such-file.json", revision=sha, cache_dir=cache, endpoint=hub.endpoint)


def test_virtual_file_is_listed_but_never_served(hub: HubStandin, model_dir: Path) -> None:
    sha = hub.add_repo(REPO, model_dir)
    huge = 2 * 1024**5
    hub.add_virtual_file(REPO, "model-huge.safetensors", huge)
    api = HfApi(endpoint=hub.endpoint)

    sizes = {e.path: e.size for e in api.list_repo_tree(REPO, revision=sha, recursive=True) if isinstance(e, RepoFile)}
    assert sizes["model-huge.safetensors"] == huge
    meta = get_hf_file_metadata(hf_hub_url(REPO, "model-huge.safetensors", revision=sha, endpoint=hub.endpoint))
    assert meta.size == huge
    assert hub.count("GET", "model-huge.safetensors") == 0


def test_stop_closes_the_port(model_dir: Path) -> None:
    standin = HubStandin().start()
    standin.add_repo(REPO, model_dir)
    port = int(standin.endpoint.rsplit(":", 1)[1])
    assert HfApi(endpoint=standin.endpoint).model_info(REPO).id == REPO  # leaves a kept-alive connection
    standin.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# -- uploads ----------------------------------------------------------------------------------

WRITER = "hf_standin_writer"


def _push(api: HfApi, repo: str, model_dir: Path, revision: str | None = None) -> str:
    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path, str(model_dir / path)) for path in _files(model_dir)]
    return api.create_commit(repo, operations, commit_message="upload", revision=revision).oid


def test_upload_then_download_byte_identical(hub: HubStandin, model_dir: Path, source: dict[str, bytes],
                                             cache: Path) -> None:
    """create_repo, then one commit of every file (the weights over LFS: batch, PUT, verify;
    the small files inline), then a download of what was committed."""
    hub.add_writer(WRITER, "you")
    api = HfApi(endpoint=hub.endpoint, token=WRITER)
    assert api.create_repo("you/tiny", exist_ok=True).repo_id == "you/tiny"
    assert api.create_repo("you/tiny", exist_ok=True).repo_id == "you/tiny"  # 409, taken as there
    sha = _push(api, "you/tiny", model_dir)

    assert api.model_info("you/tiny").sha == sha
    assert hub.files("you/tiny") == source
    lfs = [p for p, data in source.items() if _is_lfs(p, data)]
    assert hub.count("PUT", "") == len(lfs) == hub.count("POST", "/info/lfs/objects/verify")
    assert hub.count("POST", "/info/lfs/objects/batch") == 1
    snapshot = Path(snapshot_download("you/tiny", revision="main", cache_dir=cache, endpoint=hub.endpoint))
    assert _files(snapshot) == source
    tree = {e.path: e for e in api.list_repo_tree("you/tiny", revision=sha, recursive=True) if isinstance(e, RepoFile)}
    for path, data in source.items():
        assert tree[path].blob_id == git_blob_oid(data)
        assert (tree[path].lfs.sha256 if tree[path].lfs else None) == (
            hashlib.sha256(data).hexdigest() if _is_lfs(path, data) else None)

    # Again: nothing changed, so nothing goes up and no commit is made.
    hub.clear_requests()
    assert _push(api, "you/tiny", model_dir) == sha
    assert hub.count("PUT", "") == 0 and hub.count("POST", "/commit/main") == 0


def test_upload_to_a_branch(hub: HubStandin, model_dir: Path, source: dict[str, bytes]) -> None:
    hub.add_writer(WRITER, "you")
    api = HfApi(endpoint=hub.endpoint, token=WRITER)
    api.create_repo("you/tiny")
    api.create_branch("you/tiny", branch="v1")
    api.create_branch("you/tiny", branch="v1", exist_ok=True)
    sha = _push(api, "you/tiny", model_dir, revision="v1")
    assert api.model_info("you/tiny", revision="v1").sha == sha
    assert hub.files("you/tiny", "v1") == source and hub.files("you/tiny") == {}
    with pytest.raises(RevisionNotFoundError):
        _push(api, "you/tiny", model_dir, revision="no-such-branch")


def test_uploads_need_a_writers_token(hub: HubStandin, model_dir: Path) -> None:
    """No token or an unknown one: 401; a token of another namespace: 403; each request that
    writes is checked, and the presigned upload URL asks for its signature instead."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    hub.add_repo(REPO, model_dir)
    hub.add_writer(WRITER, "you")
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token="hf_unknown").create_repo("you/x")
    assert err.value.response.status_code == 401
    assert err.value.server_message == "Invalid credentials in Authorization header"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token=WRITER).create_repo("them/x")
    assert err.value.response.status_code == 403 and 'namespace "them"' in err.value.server_message
    with pytest.raises(HfHubHTTPError) as err:  # someone else's existing repo
        HfApi(endpoint=hub.endpoint, token=WRITER).create_commit(
            REPO, [CommitOperationAdd("a.json", b"{}")], commit_message="x")
    assert err.value.response.status_code == 403 and f"write to {REPO}" in err.value.server_message
    with httpx.Client() as client:
        for path in ("/api/repos/create", f"/api/models/{REPO}/preupload/main", f"/{REPO}.git/info/lfs/objects/batch",
                     f"/api/models/{REPO}/commit/main", f"/api/models/{REPO}/branch/v2"):
            assert client.post(hub.endpoint + path, json={"name": "x", "organization": "you"}).status_code == 401, path
        oid = "0" * 64
        assert client.put(f"{hub.endpoint}/lfs-upload/{oid}?sig=forged", content=b"x").status_code == 403


def test_a_commit_naming_an_lfs_object_never_uploaded_fails(hub: HubStandin) -> None:
    hub.add_writer(WRITER, "you")
    HfApi(endpoint=hub.endpoint, token=WRITER).create_repo("you/x")
    lines = [{"key": "header", "value": {"summary": "x"}},
             {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "1" * 64, "size": 3}}]
    body = b"".join(json_line(line) for line in lines)
    r = httpx.post(f"{hub.endpoint}/api/models/you/x/commit/main", content=body,
                   headers={"Authorization": f"Bearer {WRITER}", "Content-Type": "application/x-ndjson"})
    assert r.status_code == 422 and "never uploaded" in r.json()["error"]
    assert hub.files("you/x") == {}


def json_line(value: object) -> bytes:
    import json

    return json.dumps(value).encode() + b"\n"
