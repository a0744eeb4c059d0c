"""A local stand-in for the Hugging Face Hub's HTTP API, for the publishing tests only: the real Hub cannot be
reached from this machine (no network beyond package registries), so this answers the requests huggingface_hub
makes when publishing (create repo, create branch, paths-info, preupload, the LFS batch and upload, commit) and
records every commit. Uploads use the LFS protocol (HF_HUB_DISABLE_XET=1): the Xet protocol needs the Hub's CAS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # LFS objects by sha256
    commits: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, authorization
    lock: threading.Lock = field(default_factory=threading.Lock)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def serve() -> tuple[ThreadingHTTPServer, Hub, str]:
    hub = Hub()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str, message: str) -> None:
            self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

        def _record(self) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Authorization")))

        def do_PUT(self):  # noqa: N802 - the LFS upload action
            self._record()
            m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
            data = self._body()
            if not m or hashlib.sha256(data).hexdigest() != m.group(1):
                return self._error(400, "BadRequest", "sha256 mismatch")
            with hub.lock:
                hub.blobs[m.group(1)] = data
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):  # noqa: N802
            self._record()
            body = self._body()
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                data = json.loads(body)
                repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                private = data.get("visibility", "private" if data.get("private") else "public") == "private"
                with hub.lock:
                    exists = repo_id in hub.repos
                    hub.repos.setdefault(repo_id, Repo(private=private))
                url = {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id}
                if exists:  # as the Hub: 409, with the repo's url
                    return self._json(409, {"error": "You already created this model repo", **url},
                                      {"X-Error-Message": "You already created this model repo"})
                return self._json(200, url)
            if path == "/api/validate-yaml":  # the root model card's metadata, checked before a commit
                return self._json(200, {"errors": [], "warnings": []})
            if m := re.fullmatch(r"/api/models/(.+)/branch/([^/]+)", path):
                repo = hub.repos.get(m.group(1))
                if repo is None:
                    return self._error(404, "RepoNotFound", "Repository not found")
                if m.group(2) in repo.branches:
                    return self._error(409, "Conflict", "Reference already exists")
                repo.branches[m.group(2)] = dict(repo.branches["main"])
                return self._json(200, {})
            if m := re.fullmatch(r"/api/models/(.+)/paths-info/([^/]+)", path):
                repo = hub.repos.get(m.group(1))
                if repo is None or m.group(2) not in repo.branches:
                    return self._error(404, "RevisionNotFound", "Revision not found")
                files = repo.branches[m.group(2)]
                paths = json.loads(body)["paths"] if body.startswith(b"{") else \
                    parse_qs(body.decode()).get("paths", [])
                out = [{"type": "file", "path": p, "size": len(files[p]), "oid": _git_oid(files[p])}
                       for p in paths if p in files]
                return self._json(200, out)
            if m := re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path):
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "shouldIgnore": False, "oid": None,
                                                   "uploadMode": "lfs" if f["path"].endswith((".gguf", ".safetensors"))
                                                   else "regular"} for f in files]})
            if m := re.fullmatch(r"/(.+)\.git/info/lfs/objects/batch", path):
                data = json.loads(body)
                host = self.headers["Host"]
                objects = []
                for o in data["objects"]:
                    item = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                    if o["oid"] not in hub.blobs:
                        item["actions"] = {"upload": {"href": f"http://{host}/lfs-upload/{o['oid']}"}}
                    objects.append(item)
                return self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                                  {"Content-Type": "application/vnd.git-lfs+json"})
            if m := re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path):
                repo = hub.repos.get(m.group(1))
                branch = m.group(2)
                if repo is None or branch not in repo.branches:
                    return self._error(404, "RevisionNotFound", "Revision not found")
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(x["value"] for x in lines if x["key"] == "header")
                files: dict[str, bytes] = {}
                for x in lines:
                    if x["key"] == "file":
                        files[x["value"]["path"]] = base64.b64decode(x["value"]["content"])
                    elif x["key"] == "lfsFile":
                        if x["value"]["oid"] not in hub.blobs:
                            return self._error(400, "BadRequest", f"LFS object {x['value']['oid']} not uploaded")
                        files[x["value"]["path"]] = hub.blobs[x["value"]["oid"]]
                oid = hashlib.sha1(json.dumps(sorted(files)).encode() + str(len(hub.commits)).encode()).hexdigest()
                with hub.lock:
                    repo.branches[branch].update(files)
                    hub.commits.append({"repo": m.group(1), "revision": branch, "summary": header["summary"],
                                        "description": header.get("description", ""), "files": files, "oid": oid})
                return self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{m.group(1)}/commit/{oid}",
                                        "commitOid": oid, "pullRequestUrl": None})
            return self._error(404, "NotFound", f"stand-in Hub does not serve POST {path}")

        def do_GET(self):  # noqa: N802
            self._record()
            return self._error(404, "NotFound", f"stand-in Hub does not serve GET {self.path}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hub, f"http://127.0.0.1:{server.server_address[1]}"
