"""A stand-in Hugging Face Hub on 127.0.0.1 for upload tests.

It speaks the part of the Hub HTTP API ``huggingface_hub`` uses for ``whoami``, ``create_repo``
and ``upload_folder``: the login check (only :data:`TOKEN` is valid), repo creation, README
metadata validation, ``preupload`` (every file answered "regular", so contents travel base64
inside the NDJSON commit payload) and ``commit``. Committed files are kept in memory.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "hf_stand_in_token"


class StandInHub:
    """In-memory Hub: ``repos[repo_id] = {"private": bool, "files": {path: bytes}}``.

    ``fail[endpoint] = status`` answers that endpoint ("create", "preupload", "commit") with an
    error. Every request is logged as ``(method, path, lower-cased headers)``; unknown routes
    land in ``unexpected`` and get a 404.
    """

    MAX_BODY = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.unexpected: list[str] = []
        self.commit_attempts = 0
        self.fail: dict[str, int] = {}
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # seconds per socket read: a stuck client cannot hang the test

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub._handle(self)

            def do_POST(self) -> None:
                hub._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    # -- request plumbing

    def _body(self, req: BaseHTTPRequestHandler) -> bytes:
        if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(req.rfile.readline().strip(), 16)
                if size == 0:
                    req.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > self.MAX_BODY:
                    raise ValueError("request body too large")
                chunks.append(req.rfile.read(size))
                req.rfile.readline()
        length = int(req.headers.get("Content-Length") or 0)
        if length > self.MAX_BODY:
            raise ValueError("request body too large")
        return req.rfile.read(length)

    @staticmethod
    def _reply(
        req: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            req.send_header(key, value)
        req.end_headers()
        req.wfile.write(data)

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        with self.lock:
            self.requests.append(
                (req.command, path, {k.lower(): v for k, v in req.headers.items()})
            )
        try:
            body = self._body(req)
        except ValueError as err:
            return self._reply(req, 413, {"error": str(err)})
        routes = [
            ("GET", r"/api/whoami-v2", self._whoami),
            ("POST", r"/api/repos/create", self._create),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", self._preupload),
            ("POST", r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", self._commit),
        ]
        for method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if req.command == method and match:
                if not req.headers.get("Authorization"):
                    return self._reply(req, 401, {"error": "Invalid credentials in Authorization"})
                return handler(req, body, *match.groups())
        with self.lock:
            self.unexpected.append(f"{req.command} {path}")
        self._reply(req, 404, {"error": f"no route {req.command} {path}"})

    # -- endpoints

    def _whoami(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        if req.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._reply(req, 401, {"error": "Invalid credentials in Authorization header"})
        self._reply(
            req,
            200,
            {
                "type": "user",
                "name": "stand-in-user",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            },
        )

    def _create(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        if "create" in self.fail:
            return self._reply(req, self.fail["create"], {"error": "create refused"})
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or 'stand-in-user'}/{payload['name']}"
        with self.lock:
            if repo_id in self.repos:
                # The Hub names the existing repo's URL in the 409 body; create_repo reads it.
                return self._reply(
                    req,
                    409,
                    {
                        "error": "You already created this model repo",
                        "url": f"{self.url}/{repo_id}",
                    },
                )
            self.repos[repo_id] = {
                "private": payload.get("visibility") == "private",
                "files": {},
                "commits": [],
            }
        self._reply(req, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        self._reply(req, 200, {"errors": [], "warnings": []})

    def _repo_or_404(self, req: BaseHTTPRequestHandler, repo_id: str) -> dict | None:
        if repo_id not in self.repos:
            self._reply(
                req, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            )
            return None
        return self.repos[repo_id]

    def _preupload(self, req: BaseHTTPRequestHandler, body: bytes, repo_id: str, rev: str) -> None:
        if "preupload" in self.fail:
            return self._reply(req, self.fail["preupload"], {"error": "preupload refused"})
        if self._repo_or_404(req, repo_id) is None:
            return
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in json.loads(body)["files"]
        ]
        self._reply(req, 200, {"files": files, "commitOid": "0" * 40})

    def _commit(self, req: BaseHTTPRequestHandler, body: bytes, repo_id: str, rev: str) -> None:
        with self.lock:
            self.commit_attempts += 1
        if "commit" in self.fail:
            # Retry-After: 0 keeps the client's backoff at 1 s per retry.
            return self._reply(
                req,
                self.fail["commit"],
                {"error": "Internal Error - stand-in commit failure"},
                {"Retry-After": "0"},
            )
        repo = self._repo_or_404(req, repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header, files = lines[0], {}
        assert header["key"] == "header", header
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return self._reply(req, 422, {"error": f"unsupported operation {line['key']}"})
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = uuid.uuid4().hex + "0" * 8  # 40 hex digits, like a git sha
        with self.lock:
            repo["files"].update(files)
            repo["commits"].append({"oid": oid, "summary": header["value"]["summary"]})
        self._reply(req, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid})
