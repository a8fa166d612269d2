"""A tiny in-memory stand-in for the Hugging Face Hub, for upload/download tests without a network.

It answers the routes that ``huggingface_hub`` 2.x uses for ``create_repo``, ``create_branch``,
``upload_folder`` (plain "regular" uploads, never LFS or xet), ``repo_info``/``list_repo_tree`` and
``hf_hub_download``/``snapshot_download``. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class FakeHub:
    """Serve an in-memory Hub on ``127.0.0.1`` from a background thread; use as a context manager."""

    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"refs": {branch: sha}, "commits": {sha: {path: bytes}}}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["refs"].get(revision, revision)]

    def commit(self, repo_id: str, parent: str | None, files: dict[str, bytes], branch: str) -> str:
        digest = hashlib.sha1(repr((parent, sorted((p, hashlib.sha1(b).hexdigest()) for p, b in files.items()))).encode())
        sha = digest.hexdigest()
        repo = self.repos[repo_id]
        repo["commits"][sha] = files
        repo["refs"][branch] = sha
        return sha


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        # -- plumbing
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, data, headers: dict | None = None):
            self._send(status, json.dumps(data).encode(), headers)

        def _error(self, status: int, code: str, message: str, headers: dict | None = None):
            self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _parts(self) -> list[str]:
            hub.requests.append((self.command, self.path))
            return [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]

        def _resolve(self, repo_id: str, revision: str):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            sha = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Revision {revision} not found")
            return sha

        # -- reads
        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            parts = self._parts()
            with hub.lock:
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id = "/".join(parts[2:4])
                    rest = parts[4:]
                    if not rest or rest[0] == "revision":
                        sha = self._resolve(repo_id, rest[1] if len(rest) > 1 else "main")
                        if sha:
                            files = hub.repos[repo_id]["commits"][sha]
                            self._json(200, {"id": repo_id, "sha": sha, "private": False,
                                             "siblings": [{"rfilename": p} for p in sorted(files)]})
                        return
                    if rest[0] == "tree" and len(rest) >= 2:
                        sha = self._resolve(repo_id, rest[1])
                        if sha:
                            files = hub.repos[repo_id]["commits"][sha]
                            self._json(200, [{"type": "file", "path": p, "size": len(b), "oid": _git_oid(b)}
                                             for p, b in sorted(files.items())])
                        return
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
                    sha = self._resolve(repo_id, parts[3])
                    if not sha:
                        return
                    content = hub.repos[repo_id]["commits"][sha].get(filename)
                    if content is None:
                        self._error(404, "EntryNotFound", f"{filename} not found", {"X-Repo-Commit": sha})
                        return
                    self._send(200, content, {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(content)}"'},
                               content_type="application/octet-stream")
                    return
            self._error(404, "NotFound", f"No route for GET {self.path}")

        # -- writes
        def do_POST(self):
            parts = self._parts()
            body = self._body()
            with hub.lock:
                if parts == ["api", "repos", "create"]:
                    payload = json.loads(body)
                    repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
                    url = f"{hub.url}/{repo_id}"
                    if repo_id in hub.repos:
                        self._json(409, {"error": "You already created this model repo", "url": url})
                        return
                    hub.repos[repo_id] = {"refs": {}, "commits": {}}
                    hub.commit(repo_id, None, {".gitattributes": b"*.safetensors filter=lfs\n"}, "main")
                    self._json(200, {"url": url, "name": repo_id})
                    return
                if parts == ["api", "validate-yaml"]:
                    self._json(200, {"errors": [], "warnings": []})
                    return
                if parts[:2] == ["api", "models"] and len(parts) == 6:
                    repo_id, action, revision = "/".join(parts[2:4]), parts[4], parts[5]
                    if action == "preupload":
                        if self._resolve(repo_id, revision):
                            files = json.loads(body)["files"]
                            self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                        return
                    if action == "branch":
                        if self._resolve(repo_id, "main"):
                            repo = hub.repos[repo_id]
                            if revision in repo["refs"]:
                                self._error(409, "BranchExists", f"Branch {revision} already exists")
                            else:
                                repo["refs"][revision] = repo["refs"]["main"]
                                self._json(200, {})
                        return
                    if action == "commit":
                        parent = self._resolve(repo_id, revision)
                        if not parent:
                            return
                        files = dict(hub.repos[repo_id]["commits"][parent])
                        for line in body.splitlines():
                            item = json.loads(line)
                            value = item["value"]
                            if item["key"] == "file":
                                files[value["path"]] = base64.b64decode(value["content"])
                            elif item["key"] in ("deletedFile", "deletedFolder"):
                                prefix = value["path"].rstrip("/") + "/"
                                files = {p: b for p, b in files.items() if p != value["path"] and not p.startswith(prefix)}
                            elif item["key"] != "header":
                                self._error(400, "BadRequest", f"unsupported commit operation {item['key']}")
                                return
                        sha = hub.commit(repo_id, parent, files, revision)
                        self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                         "pullRequestUrl": None, "success": True})
                        return
            self._error(404, "NotFound", f"No route for POST {self.path}")

    return Handler
