"""The server's read deadline (serve/protocol.py): a request that does not arrive whole in time gets 408 and its
connection closed, over uvicorn's h11 and httptools protocols; requests that arrive, and long responses, are
never cut."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from workbench.errors import WorkbenchError
from workbench.serve.protocol import read_timeout_protocol

uvicorn = pytest.importorskip("uvicorn")

TIMEOUT = 1.0


async def app(scope, receive, send):
    """Echoes the body's length; /slow streams for 2.5 timeouts (a response longer than the read deadline)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/slow":
        for _ in range(5):
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(TIMEOUT / 2)
    await send({"type": "http.response.body", "body": f"got {len(body)}".encode()})


@pytest.fixture(scope="module", params=["h11", "httptools"])
def port(request):
    if request.param == "httptools":
        pytest.importorskip("httptools")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=free, log_level="warning",
                            http=read_timeout_protocol(TIMEOUT, request.param))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield free
    server.should_exit = True
    thread.join(10)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10 * TIMEOUT)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def request(path: str, body: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def assert_timed_out(s: socket.socket, started: float) -> None:
    data = read_all(s)
    waited = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
    error = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert TIMEOUT * 0.9 <= waited < TIMEOUT * 8  # after the deadline, not before (and not never)


@pytest.mark.parametrize("part", ["POST /v1/completions HT", "POST / HTTP/1.1\r\nHost: localhost\r\n"])
def test_a_request_whose_headers_do_not_arrive_gets_408_and_is_closed(port, part):
    with connect(port) as s:
        started = time.monotonic()
        s.sendall(part.encode())
        assert_timed_out(s, started)


def test_a_request_whose_body_does_not_arrive_gets_408_and_is_closed(port):
    with connect(port) as s:
        started = time.monotonic()
        s.sendall(request("/", b'{"prompt": "x"}')[:-5])  # headers whole; 5 bytes of the body never come
        assert_timed_out(s, started)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port):
    with connect(port) as s:
        started = time.monotonic()
        assert read_all(s) == b""
        assert time.monotonic() - started >= TIMEOUT * 0.9


def test_a_request_trickled_within_the_deadline_and_a_long_response_are_served(port):
    body = b'{"prompt": "' + b"y" * 1000 + b'"}'
    whole = request("/", body)
    with connect(port) as s:
        for i in range(0, len(whole), len(whole) // 4 + 1):  # in four pieces over 0.6 timeouts
            s.sendall(whole[i:i + len(whole) // 4 + 1])
            time.sleep(TIMEOUT * 0.15)
        s.sendall(request("/slow"))  # then, kept alive, a response that lasts 2.5 timeouts
        s.settimeout(5 * TIMEOUT)
        data = b""
        while data.count(b"got ") < 2:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200") and f"got {len(body)}".encode() in data
    assert data.count(b"tick") == 5 and b"got 0" in data and data.endswith(b"0\r\n\r\n") and b"408" not in data


def test_the_next_request_on_a_kept_alive_connection_has_its_own_deadline(port):
    with connect(port) as s:
        s.sendall(request("/", b"{}"))
        first = b""
        while not first.endswith(b"\r\n0\r\n\r\n"):  # the chunked response's end
            first += s.recv(65536)
        started = time.monotonic()  # the next request's clock starts when the first one's response ends
        assert first.startswith(b"HTTP/1.1 200") and b"got 2" in first
        time.sleep(TIMEOUT * 0.3)
        s.sendall(b"POST / HTTP/1.1\r\nHost: local")
        assert_timed_out(s, started)


def test_a_bad_read_timeout_is_one_line():
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(WorkbenchError, match="read timeout"):
            read_timeout_protocol(bad)
    with pytest.raises(WorkbenchError, match="auto, httptools or h11"):
        read_timeout_protocol(1.0, "h2")
