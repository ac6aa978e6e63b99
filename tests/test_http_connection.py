"""The remote client's persistent HTTP connection: keep-alive, reopening what the server closed, URL prefixes."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from mlip.http_connection import HTTPConnection
from mlip.remote import RemoteCalculator


class EchoServer(ThreadingHTTPServer):
    """Answers every POST with its path and body; ``close_after_answer`` drops the connection after each answer
    without saying so (as a server does with a keep-alive connection that sat idle past its timeout)."""

    daemon_threads = True

    def __init__(self, close_after_answer: bool):
        self.close_after_answer, self.connections, self.paths = close_after_answer, 0, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                server.connections += 1

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = server.close_after_answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def handle_error(self, request, client_address) -> None:
        """A client that hung up before its answer was written (these tests drop connections) is not a server fault."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(params=[False, True], ids=["keep-alive", "closed-while-idle"])
def echo(request) -> Iterator[EchoServer]:
    server = EchoServer(close_after_answer=request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_requests_share_one_connection_and_a_dropped_one_is_reopened(echo):
    conn = HTTPConnection(echo.url, {"Authorization": "Bearer k"}, timeout=10)
    for i in range(3):
        assert conn.post("/v1/calculate", f"step {i}".encode(), {}) == (200, "application/octet-stream", f"step {i}".encode())
    conn.close()
    # keep-alive: one connection for all; closed after each answer: each later request found its connection
    # dropped, reopened it and was answered (the first try on the dead connection is not an error)
    assert echo.connections == (3 if echo.close_after_answer else 1)


def test_a_dropped_fresh_connection_is_an_error_not_a_loop(echo, monkeypatch):
    conn = HTTPConnection(echo.url, {}, timeout=10)
    conn.post("/", b"first", {})
    sent = []
    request = conn._conn.request
    monkeypatch.setattr(conn._conn, "request", lambda *args, **kwargs: sent.append(conn._conn.sock) or request(*args, **kwargs))
    monkeypatch.setattr(conn._conn, "getresponse", lambda: (_ for _ in ()).throw(ConnectionResetError("reset")))
    with pytest.raises(ConnectionResetError):
        conn.post("/", b"second", {})
    assert len(sent) == 2 and sent[0] is not None and sent[1] is None  # once reused, once on a new connection, no more


def test_url_prefix_is_kept_and_bad_urls_are_refused():
    server = EchoServer(close_after_answer=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        HTTPConnection(server.url + "/mlip/", {}, timeout=10).post("/v1/calculate", b"x", {})
        assert server.paths == ["/mlip/v1/calculate"]
    finally:
        server.shutdown()
        server.server_close()
    for url in ("ftp://host", "127.0.0.1:8000", "http://"):
        with pytest.raises(ValueError, match="server URL"):
            RemoteCalculator(url)
