"""How long a client may take to send a request: uvicorn's HTTP protocol with a read deadline.

    protocol = read_timeout_protocol(30.0)          # uvicorn.Config(app, http=protocol)
    workbench serve engine/ --read-timeout 30

uvicorn waits for a request's headers and body as long as the client likes: a connection that sends half a
request line, or headers that announce a body and then a byte now and then ("slowloris"), holds a socket and its
buffers forever, and enough of them leave no file descriptors for real clients. nginx's answer is a time limit on
reading the headers and the body (``client_header_timeout``, ``client_body_timeout``); this module gives uvicorn's
protocols the same:

- A request has ``seconds`` to arrive whole, headers and body, from when the server starts waiting for it (the
  connection's start, or the previous response's end on a kept-alive connection).
- Past that, the client gets ``408 Request Timeout`` with OpenAI's error body and the connection is closed (a
  connection that sent nothing at all is closed without a word, as nginx does).
- A request that has arrived is never cut, however long its response takes, nor one the app answered before
  reading all of its body. An idle kept-alive connection is closed sooner, by uvicorn's own keep-alive timeout.

Works over uvicorn's ``httptools`` protocol (when installed: the faster one, which ``uvicorn[standard]`` and vLLM
use) and its ``h11`` one; both keep the request being read in ``cycle`` (``more_body``, ``response_started``,
``response_complete``), which is all this reads of them.
"""

from __future__ import annotations

import asyncio
import json

from ..errors import WorkbenchError

DEFAULT_READ_TIMEOUT = 30.0


def base_protocol(kind: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class: "httptools" (the C parser), "h11" (pure Python), or "auto" (httptools when
    installed, as uvicorn chooses)."""
    if kind == "auto":
        from uvicorn.protocols.http.auto import AutoHTTPProtocol
        return AutoHTTPProtocol
    if kind == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        return HttpToolsProtocol
    if kind == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol
        return H11Protocol
    raise WorkbenchError(f"unknown HTTP protocol {kind!r}; give auto, httptools or h11")


def timeout_response(seconds: float) -> bytes:
    """The 408 a client gets when its request did not arrive in time, closing the connection."""
    body = json.dumps({"error": {
        "message": f"the request did not arrive whole within {seconds:g} s; send its headers and body at once",
        "type": "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def read_timeout_protocol(seconds: float = DEFAULT_READ_TIMEOUT, kind: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (``base_protocol(kind)``) with a read deadline of ``seconds`` for each request (see
    the module). Give it to ``uvicorn.Config(http=...)``."""
    if not seconds > 0:
        raise WorkbenchError(f"the read timeout is {seconds!r} seconds; give a positive number (--read-timeout)")
    base = base_protocol(kind)

    class ReadTimeoutProtocol(base):
        read_timeout = float(seconds)
        _deadline: asyncio.TimerHandle | None = None
        _received = False  # bytes of the request being waited for have come

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._follow()

        def data_received(self, data: bytes) -> None:
            self._received = True
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._received = False  # the next request on this connection, if one comes
            self._follow()

        def connection_lost(self, exc) -> None:
            self._stop()
            super().connection_lost(exc)

        def _reading(self) -> bool:
            """Whether the server waits for (part of) a request: none under way, or one whose body is still
            coming and that has no response yet."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return True
            return cycle.more_body and not cycle.response_started

        def _follow(self) -> None:
            """Start the deadline when the server starts waiting for a request; stop it once the request is in."""
            if self.transport is None or self.transport.is_closing() or not self._reading():
                self._stop()
            elif self._deadline is None:
                self._deadline = self.loop.call_later(self.read_timeout, self._expired)

        def _stop(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport is None or self.transport.is_closing() or not self._reading():
                return  # the request came in (its response has started since), or the connection went
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app's next receive() says http.disconnect
                cycle.message_event.set()
            if self._received:
                self.transport.write(timeout_response(self.read_timeout))
            self.transport.close()

    ReadTimeoutProtocol.__name__ = ReadTimeoutProtocol.__qualname__ = f"ReadTimeout{base.__name__}"
    return ReadTimeoutProtocol


__all__ = ["DEFAULT_READ_TIMEOUT", "base_protocol", "read_timeout_protocol", "timeout_response"]
