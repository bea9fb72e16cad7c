"""The CLI against things that are not an nvit service, and a service state that cannot be used: each ends in
one error line and exit status 1, never a traceback (``--lut http://...``, ``profile --remote``, ``agent
--server`` against an HTML page or JSON of another shape; ``serve`` and ``serve token`` with a file for a
state folder or a corrupt database)."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading

import pytest
from cli_run import run_cli

SHA = "ab" * 32
HTML = b"<!DOCTYPE html><html><body><h1>Welcome to nginx!</h1>\n<p>It works.</p></body></html>\n"


@contextlib.contextmanager
def impostor(content_type: str, body: bytes):
    """A web server on 127.0.0.1 that answers every GET and POST with 200 and this body."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def one_line(argv: list[str], capsys, text: str) -> None:
    code, _, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, (argv, err)
    assert text in lines[0], (argv, lines[0])


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.delenv("NVIT_DEBUG", raising=False)
    monkeypatch.delenv("NVIT_TOKEN", raising=False)
    monkeypatch.setenv("NVIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NVIT_LOCK_DIR", str(tmp_path / "locks"))


@pytest.mark.parametrize("content_type,body,text", [
    ("text/html", HTML, "is not an nvit service"),
    ("application/json", json.dumps({"hello": "world", "id": "x"}).encode(), "is not an nvit service"),
    ("application/json", json.dumps([{"name": "a table?"}]).encode(), "is not an nvit service"),
])
def test_clients_against_a_server_that_is_not_nvit_say_so_in_one_line(content_type, body, text, capsys,
                                                                       tmp_path) -> None:
    with impostor(content_type, body) as url:
        one_line(["predict", "--lut", f"{url}/v1/luts?device=cpu", "--arch", "vit_test"], capsys,
                 text if body.startswith((b"<", b"{")) else "has no 'sha256'")
        one_line(["predict", "--lut", f"{url}/v1/luts/{SHA}", "--arch", "vit_test"], capsys, f"not {SHA}")
        one_line(["profile", "--remote", url, "--space", "vit_test"], capsys, "is not an nvit service")
        one_line(["agent", "--server", url, "--work-dir", str(tmp_path / "agent"), "--poll-s", "1"], capsys,
                 "is not an nvit service")


def test_serve_with_an_unusable_state_says_so_in_one_line(tmp_path, capsys) -> None:
    a_file = tmp_path / "state.txt"
    a_file.write_text("not a folder")
    one_line(["serve", "--state", str(a_file), "--port", "0"], capsys, "is a file, not a folder")
    one_line(["serve", "token", "create", "--state", str(a_file), "--name", "x"], capsys, "is a file, not a folder")
    one_line(["serve", "token", "list", "--state", str(a_file / "below")], capsys, "service state")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "nvit.db").write_bytes(b"this is not a database " * 100)
    for argv in (["serve", "--state", str(corrupt), "--port", "0"],
                 ["serve", "token", "create", "--state", str(corrupt), "--name", "x"],
                 ["serve", "token", "list", "--state", str(corrupt)]):
        one_line(argv, capsys, "cannot open database")
