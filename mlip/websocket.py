"""A blocking WebSocket client that runs entirely in the caller's thread.

websockets' own sync client reads the socket in a background thread and hands each message over
through a queue; in an MD loop that hand-off is paid on every step. Here the caller's ``recv``
reads the socket itself and feeds websockets' sans-I/O ``ClientProtocol`` (which also answers
pings while it waits), so one step costs one send and the reads that bring its reply. Between
calls nothing reads: a connection idle past the server's keepalive (uvicorn: 20 s ping + 20 s) is
closed by the server, and ``RemoteCalculator`` reconnects and resends the structure.
"""

from __future__ import annotations

import socket
import ssl
from typing import Mapping

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

READ_BYTES = 1 << 16


class WebSocket:
    """One client connection: ``send`` binary messages, ``recv`` whole messages; ``OSError`` when it drops."""

    def __init__(self, url: str, headers: Mapping[str, str], timeout: float, max_size: int):
        """Open the TCP (TLS for wss://) connection and complete the handshake within ``timeout`` s.

        Raises websockets' ``InvalidStatus`` (with ``.response``) when the server refuses the upgrade.
        """
        uri = parse_uri(url)
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        if uri.secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=uri.host)
        self.sock, self.protocol = sock, ClientProtocol(uri, max_size=max_size)
        self._pending: list = []
        try:
            request = self.protocol.connect()
            request.headers.update(headers)
            self.protocol.send_request(request)
            self._flush()
            while not any(isinstance(event, Response) for event in self._pending):
                self._read()
            if self.protocol.handshake_exc is not None:
                raise self.protocol.handshake_exc
            self._pending = [e for e in self._pending if not isinstance(e, Response)]
        except BaseException:
            self.sock.close()
            raise

    def send(self, data: bytes) -> None:
        self.protocol.send_binary(data)
        self._flush()

    def recv(self, timeout: float) -> bytes:
        """The next whole message (text or binary) as bytes; ``TimeoutError`` after ``timeout`` s of silence."""
        self.sock.settimeout(timeout)
        parts: list[bytes] = []
        while True:
            while self._pending:
                frame = self._pending.pop(0)
                if not isinstance(frame, Frame):
                    continue
                if frame.opcode is Opcode.CLOSE:
                    raise ConnectionError(f"server closed the WebSocket ({self.protocol.close_code})")
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                    parts.append(bytes(frame.data))
                    if frame.fin:
                        return b"".join(parts)
            self._read()

    def close(self) -> None:
        """Say goodbye if the connection is still open, then close the socket (never raises)."""
        try:
            if self.protocol.state is State.OPEN:
                self.protocol.send_close()
                self._flush()
        except OSError:
            pass
        finally:
            self.sock.close()

    def _read(self) -> None:
        data = self.sock.recv(READ_BYTES)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        self._flush()  # pongs and close replies the protocol queued
        self._pending += self.protocol.events_received()
        if not data:
            raise ConnectionError("server closed the connection")

    def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.sock.sendall(chunk)
