"""HTTP/1.1 over a raw socket: for requests no client library will send (bad headers, half
bodies, non-UTF-8 bytes) and for hanging up at exactly the wrong moment."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, bytes | str | None] | None = None,
) -> bytes:
    """A whole request; `headers` override the defaults (None drops one)."""
    merged: dict[str, bytes | str | None] = {
        "Host": f"127.0.0.1:{port}",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    merged.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1".encode()]
    for name, value in merged.items():
        if value is not None:
            lines.append(
                name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
            )
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _dechunk(data: bytes) -> bytes:
    out, rest = b"", data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out


def parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue): the real one follows
        head, _, body = body.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return Reply(int(status_line.split()[1]), headers, body)


def _is_complete(data: bytes) -> bool:
    """A whole answer is in: stop reading (a server that lingers to drain an unread request
    body would otherwise keep the connection open for seconds)."""
    if b"\r\n\r\n" not in data:
        return False
    try:
        reply = parse_reply(data)
    except (ValueError, IndexError):
        return False
    if "content-length" in reply.headers:
        return len(reply.body) >= int(reply.headers["content-length"])
    if reply.headers.get("transfer-encoding") == "chunked":
        return data.endswith(b"0\r\n\r\n")
    return False


def exchange(port: int, data: bytes, *, timeout: float = 30.0) -> Reply:
    """Sends `data`, reads until the server closes (requests say Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (413) and closed: its answer may still be there
        raw = b""
        try:
            while not _is_complete(raw) and (chunk := s.recv(65536)):
                raw += chunk
        except ConnectionResetError:
            pass
    assert raw, "the server closed the connection without answering"
    return parse_reply(raw)


def send_and_hang_up(
    port: int, data: bytes, *, read_bytes: int = 0, timeout: float = 30.0
) -> bytes:
    """Sends `data`, reads at least `read_bytes` of the answer (0: none), then hangs up."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        while len(got) < read_bytes:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got
