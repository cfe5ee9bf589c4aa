"""A local, in-memory stand-in for the Hugging Face Hub, for tests that must not touch the network.

It speaks the subset of the Hub HTTP API that the stock ``huggingface_hub`` client (and timm's
``hf-hub:`` loader, which goes through it) uses to create a repo, commit files and download them:

========================================================  =========================================
``POST /api/repos/create``                                create a repo (409 + ``url`` if it exists)
``POST /api/validate-yaml``                               check the model card's YAML front matter
``POST /api/models/{repo}/preupload/{rev}``               every file is answered ``"regular"``, so
                                                          no Xet/LFS upload is ever attempted
``POST /api/models/{repo}/commit/{rev}``                  ndjson commit (base64 files, deletions);
                                                          ``?create_pr=1`` opens ``refs/pr/N``
``POST /api/models/{repo}/discussions``                   open a pull request (``refs/pr/N``)
``GET  /api/models/{repo}/discussions/{num}``             pull request details
``POST /api/models/{repo}/branch/{branch}``               create a branch
``GET  /api/models/{repo}[/revision/{rev}]``              repo info (``sha``, ``siblings``)
``GET  /api/models/{repo}/tree/{rev}[/{path}]``           file listing
``HEAD|GET /{repo}/resolve/{rev}/{path}``                 file download with ``X-Repo-Commit`` and
                                                          ``ETag`` (byte ranges supported)
========================================================  =========================================

Errors carry the ``X-Error-Code`` header the client maps to its exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``). Writes need ``Authorization: Bearer <token>`` with one of
:attr:`FakeHub.tokens`; private repos also need it to be read (the Hub answers 401 + RepoNotFound).

:func:`use_fake_hub` points an already-imported ``huggingface_hub`` at the server: the client
reads ``HF_ENDPOINT`` and ``HF_HUB_CACHE`` once, at import, into module constants (and builds the
download URL template from the endpoint then), so environment variables alone are not enough.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["FakeHub", "use_fake_hub"]

_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(content: bytes) -> str:
    """The git object id of a blob, which is what the Hub reports as a regular file's ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str
    parent: str | None
    # The Hub's timestamp format, which the client parses strictly.
    date: str = field(
        default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    )


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch / refs/pr/N -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0

    def resolve(self, revision: str) -> Commit | None:
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """An in-memory Hub served over HTTP on ``127.0.0.1`` from a background thread.

    Args:
        tokens: Tokens accepted for writes (and for reading private repos).

    Attributes:
        repos: ``{repo_id: Repo}``; tests may inspect or tamper with stored files.
        requests: ``(method, path)`` of every request received, in order.
        drop_commits: When true, ``/commit`` requests get their connection closed without an
            answer, as when the network fails in the middle of a push.
    """

    def __init__(self, tokens: tuple[str, ...] = ("hf_fake_write_token",)) -> None:
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.drop_commits = False
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; the port is closed, so clients get "connection refused"."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ repo model
    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        repo = Repo(repo_id, private)
        self._commit(repo, "main", {".gitattributes": _GITATTRIBUTES}, [], "initial commit")
        self.repos[repo_id] = repo
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a copy)."""
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"no revision {revision!r}"
        return dict(commit.files)

    def put_file(self, repo_id: str, path: str, content: bytes, revision: str = "main") -> str:
        """Commit one file directly (for tests that plant bad content)."""
        with self._lock:
            return self._commit(self.repos[repo_id], revision, {path: content}, [], f"put {path}")

    def _commit(
        self, repo: Repo, ref: str, added: dict[str, bytes], deleted: list[str], message: str
    ) -> str:
        parent = repo.resolve(ref)
        files = dict(parent.files) if parent else {}
        for path in deleted:
            if path.endswith("/"):
                files = {p: c for p, c in files.items() if not p.startswith(path)}
            elif files.pop(path, None) is None:
                raise _HubError(
                    404, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                )
        files.update(added)
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        repo.commits[sha] = Commit(sha, files, message, parent.sha if parent else None)
        repo.refs[ref] = sha
        return sha


# ---------------------------------------------------------------------- HTTP handler
class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    # One request per connection: when the server stops, no pooled keep-alive connection lives
    # on, so the client really sees the network go away.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # keep pytest output clean

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        payload: Any = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> None:
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, err: _HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, {"error": err.message}, headers)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer ") :] in self.fake_hub.tokens

    def _require_write(self) -> None:
        if not self.headers.get("Authorization"):
            raise _HubError(401, "You must be authenticated to write to the Hub.")
        if not self._authorized():
            raise _HubError(401, "Invalid credentials in Authorization header.")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            # The Hub does not reveal whether a private repo exists.
            status = 401 if not self._authorized() else 404
            raise _HubError(status, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _dispatch(self, method: str) -> None:
        hub = self.fake_hub
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        # Split the raw path: revisions such as refs/pr/1 arrive percent-encoded as one segment.
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        hub.requests.append((method, split.path))
        body = self._body() if method == "POST" else b""
        try:
            with hub._lock:
                self._route(method, parts, query, body)
        except _HubError as err:
            self._error(err)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # ------------------------------------------------------------------ routes
    def _route(self, method: str, parts: list[str], query: dict[str, str], body: bytes) -> None:
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body or b"{}"))
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id = "/".join(parts[2:4])
            rest = parts[4:]
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_id, rest[1], json.loads(body or b"{}"))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_id, rest[1], body, query.get("create_pr") == "1")
            if method == "POST" and rest == ["discussions"]:
                return self._open_pull_request(repo_id, json.loads(body or b"{}"))
            if method == "GET" and len(rest) == 2 and rest[0] == "discussions":
                return self._pull_request(repo_id, int(rest[1]))
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                return self._create_branch(repo_id, rest[1], json.loads(body or b"{}"))
            if method == "GET" and (not rest or (len(rest) == 2 and rest[0] == "revision")):
                return self._repo_info(repo_id, rest[1] if rest else "main")
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(method, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        raise _HubError(404, f"Not found: {method} /{'/'.join(parts)}")

    def _create_repo(self, payload: dict) -> None:
        self._require_write()
        repo_id = f"{payload.get('organization') or 'fake-user'}/{payload['name']}"
        url = f"{self._base()}/{repo_id}"
        if repo_id in self.fake_hub.repos:
            # The client reads `url` from the 409 body too (exist_ok=True).
            return self._send(409, {"error": "You already created this model repo", "url": url})
        # huggingface_hub 2.x sends `visibility`, older clients a `private` flag.
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.fake_hub.create_repo(repo_id, private=private)
        self._send(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    def _validate_yaml(self, payload: dict) -> None:
        import yaml

        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            front = content.split("---", 2)[1]
            try:
                meta = yaml.safe_load(front)
            except yaml.YAMLError as exc:
                errors.append({"message": f"YAML parse error: {exc}"})
            else:
                if not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
                else:
                    for key in ("tags", "datasets", "metrics"):
                        value = meta.get(key)
                        if value is not None and not (
                            isinstance(value, list) and all(isinstance(v, str) for v in value)
                        ):
                            errors.append({"message": f'"{key}" must be a list of strings'})
                    if "library_name" in meta and not isinstance(meta["library_name"], str):
                        errors.append({"message": '"library_name" must be a string'})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        self._require_write()
        repo = self._repo(repo_id)
        commit = repo.resolve(revision)
        files = []
        for item in payload.get("files", []):
            existing = commit.files.get(item["path"]) if commit else None
            files.append(
                {
                    "path": item["path"],
                    # "regular" keeps every upload inline in the commit (no Xet/LFS round trip).
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha(existing) if existing is not None else None,
                }
            )
        self._send(200, {"files": files, "commitOid": commit.sha if commit else None})

    def _commit(self, repo_id: str, revision: str, body: bytes, create_pr: bool) -> None:
        self._require_write()
        repo = self._repo(repo_id)
        if self.fake_hub.drop_commits:
            self.close_connection = True
            self.connection.shutdown(2)
            return None
        base = self._commit_at(repo, revision)
        header: dict = {}
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, "only base64 file content is supported")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                path = value["path"]
                deleted.append(path if key == "deletedFile" else path.rstrip("/") + "/")
            else:
                raise _HubError(400, f"FakeHub does not support {key!r} commit operations")
        parent = header.get("parentCommit")
        if parent is not None and parent != base.sha:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        pr_url = None
        ref = revision
        if create_pr:
            repo.prs += 1
            ref = f"refs/pr/{repo.prs}"
            repo.refs[ref] = base.sha
            pr_url = f"{self._base()}/{repo_id}/discussions/{repo.prs}"
        elif revision not in repo.refs:
            raise _HubError(400, "Commits can only be pushed to a branch", "RevisionNotFound")
        sha = self.fake_hub._commit(repo, ref, added, deleted, header.get("summary", ""))
        self._send(
            200,
            {
                "commitUrl": f"{self._base()}/{repo_id}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": pr_url,
                "success": True,
            },
        )

    def _open_pull_request(self, repo_id: str, payload: dict) -> None:
        """A draft pull request on ``main``: its ref starts at main's head (what
        ``upload_folder(create_pr=True)`` opens before committing to ``refs/pr/N``)."""
        self._require_write()
        repo = self._repo(repo_id)
        if not payload.get("pullRequest"):
            raise _HubError(400, "FakeHub only opens pull requests, not discussions")
        repo.prs += 1
        repo.refs[f"refs/pr/{repo.prs}"] = repo.refs["main"]
        self._send(200, {"num": repo.prs, "pullRequest": True})

    def _pull_request(self, repo_id: str, num: int) -> None:
        repo = self._repo(repo_id)
        if f"refs/pr/{num}" not in repo.refs:
            raise _HubError(404, f"Pull request {num} not found")
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self._send(
            200,
            {
                "title": f"PR {num}",
                "num": num,
                "createdAt": now,
                "status": "draft",
                "repo": {"name": repo_id, "type": "model"},
                "isPullRequest": True,
                "events": [],
                "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": [],
                "gitReference": f"refs/pr/{num}",
            },
        )

    def _create_branch(self, repo_id: str, branch: str, payload: dict) -> None:
        self._require_write()
        repo = self._repo(repo_id)
        if branch in repo.refs:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_at(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = start.sha
        self._send(200, {})

    def _repo_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit_at(repo, revision)
        self._send(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.sha,
                "private": repo.private,
                "lastModified": commit.date,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                "tags": [],
            },
        )

    def _tree(self, repo_id: str, revision: str, prefix: str, query: dict[str, str]) -> None:
        repo = self._repo(repo_id)
        commit = self._commit_at(repo, revision)
        recursive = query.get("recursive", "false").lower() == "true"
        root = f"{prefix}/" if prefix else ""
        entries: dict[str, dict] = {}
        for path, content in sorted(commit.files.items()):
            if not path.startswith(root):
                continue
            relative = path[len(root) :]
            if recursive or "/" not in relative:
                entries[path] = {
                    "type": "file",
                    "path": path,
                    "size": len(content),
                    "oid": git_blob_sha(content),
                }
            folder = root + relative.split("/", 1)[0]
            if "/" in relative and folder not in entries:
                entries[folder] = {"type": "directory", "path": folder, "oid": "0" * 40}
            if recursive:
                parents = list(
                    itertools.accumulate(relative.split("/")[:-1], lambda a, b: f"{a}/{b}")
                )
                for parent in parents:
                    entries.setdefault(
                        root + parent, {"type": "directory", "path": root + parent, "oid": "0" * 40}
                    )
        if prefix and not entries:
            raise _HubError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        self._send(200, list(entries.values()))

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        commit = self._commit_at(repo, revision)
        content = commit.files.get(path)
        if content is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{git_blob_sha(content)}"',
            "Accept-Ranges": "bytes",
        }
        status = 200
        ranged = self.headers.get("Range")
        if ranged and ranged.startswith("bytes="):
            start_s, _, end_s = ranged[len("bytes=") :].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content = content[start : end + 1]
            status = 206
        self._send(
            status,
            headers={**headers, "Content-Type": "application/octet-stream"},
            body=content,
        )


# ---------------------------------------------------------------------- client wiring
@contextlib.contextmanager
def use_fake_hub(
    hub: FakeHub, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, token: str | None
) -> Iterator[FakeHub]:
    """Point ``huggingface_hub`` (and so timm's ``hf-hub:`` loader) at ``hub``.

    Sets the environment for anything imported later and patches the constants an imported
    ``huggingface_hub`` has already computed: the endpoint, the ``resolve`` URL template built from
    it, the cache folder, the token file locations (so a developer's real login is never read)
    and offline mode. ``token=None`` simulates a machine with no Hugging Face login.
    """
    from huggingface_hub import constants

    endpoint = hub.url
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)
    tokens = cache_dir.parent / "hf-home-tokens"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tokens / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tokens / "stored_tokens"))
    # The module-level HfApi behind huggingface_hub.create_repo etc. captured the endpoint at import.
    import huggingface_hub.hf_api as hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    yield hub
