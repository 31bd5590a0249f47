"""Fixtures for env builds: hand-made wheels and real package indexes on 127.0.0.1 that record
every request they get (``package_index``)."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


def write_wheel(where: Path, name: str = "caravela_testdep", version: str = "1.0", value: int = 42):
    """A minimal pure-Python wheel whose module holds ``VALUE = value``; no index needed."""
    dist = f"{name}-{version}"
    files = {
        f"{name}/__init__.py": f"VALUE = {value}\n",
        f"{dist}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
        ),
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: caravela-test\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    where.mkdir(parents=True, exist_ok=True)
    wheel = where / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


class PackageIndex:
    """A PEP 503 simple index over the wheels in ``wheels`` at ``url`` (``<url>/simple``),
    recording the path of every request, whatever it asks for."""

    def __init__(self, wheels: Path) -> None:
        self.wheels = wheels
        self.requests: list[str] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                index.requests.append(self.path)
                body, kind = index.answer(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def simple(self) -> str:
        return f"{self.url}/simple"

    def answer(self, path: str) -> tuple[bytes | None, str]:
        m = re.fullmatch(r"/simple/([^/]+)/?", path)
        if m:
            project = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            links = [
                f'<a href="/files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
                f"{html.escape(w.name)}</a>"
                for w in sorted(self.wheels.glob("*.whl"))
                if re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() == project
            ]
            if links:
                page = "<!DOCTYPE html><html><body>" + "<br>".join(links) + "</body></html>"
                return page.encode(), "text/html"
        m = re.fullmatch(r"/files/([^/]+\.whl)", path)
        if m and (self.wheels / m.group(1)).is_file():
            return (self.wheels / m.group(1)).read_bytes(), "application/octet-stream"
        return None, "text/plain"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def package_index(tmp_path: Path) -> Iterator[Callable[..., PackageIndex]]:
    """``package_index(*wheels)``: a fresh recording index serving those wheel files (none:
    an index that has nothing, to see whether anything asks it)."""
    started: list[PackageIndex] = []

    def start(*wheels: Path) -> PackageIndex:
        where = tmp_path / f"index-{len(started)}"
        where.mkdir()
        for w in wheels:
            (where / w.name).write_bytes(w.read_bytes())
        started.append(PackageIndex(where))
        return started[-1]

    yield start
    for index in started:
        index.close()


@pytest.fixture
def testdep_wheel(tmp_path: Path) -> Path:
    """``caravela_testdep-1.0`` (``VALUE = 42``) in a directory of its own."""
    return write_wheel(tmp_path / "built-wheels")


@pytest.fixture
def uv_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A uv cache of this test's own (``UV_CACHE_DIR``, which builds pass on to uv), so a
    wheel from another test's index is never found in it."""
    cache = tmp_path / "uv-cache"
    monkeypatch.setenv("UV_CACHE_DIR", str(cache))
    return cache
