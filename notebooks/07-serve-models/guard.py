"""uvicorn's HTTP protocols with a connection limit and timeouts for idle and slow clients.

Why this file: uvicorn closes a keep-alive connection some seconds after its last *response*, but a
connection that never sends a request, or stops half-way through its headers or body, is held open
forever, and there is no cap on how many there are. A few hundred such sockets cost an attacker
nothing and take file descriptors and memory from every honest client. The classes below add, per
server process:

* a **connection limit** (``SERVE_MAX_CONNECTIONS``): when a new connection would exceed it, the
  connection that has been the client's turn the longest (idle, or sending a request slowly) is
  closed to make room; when every connection is waiting on the server, the new one is refused;
* an **idle timeout** (``SERVE_IDLE_TIMEOUT_S``): a connection that sends nothing for that long, when
  it is the client's turn to talk, is closed;
* a **read timeout** (``SERVE_READ_TIMEOUT_S``): a request whose headers and body are not all in
  within that many seconds of its first byte gets ``408`` and the connection is closed, however
  steadily the bytes trickle in (slowloris).

Time the server spends answering is never counted against the client. Use it with
``--http guard:H11`` (pure-Python h11) or ``--http guard:HttpTools`` (httptools, the C parser of
``uvicorn[standard]``).
"""

import collections
import os
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

_BODY_408 = b'{"error": "request not received in time; the connection is closed", "details": []}'
TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
               b"content-length: %d\r\n\r\n" % len(_BODY_408)) + _BODY_408


class Guard:
    """The connections of one server process and the rules above; one instance per process."""

    def __init__(self, max_connections: int, idle_timeout_s: float, read_timeout_s: float):
        self.max_connections, self.idle_timeout_s, self.read_timeout_s = max_connections, idle_timeout_s, read_timeout_s
        self.conns: dict = {}  # protocol -> [start of the client's turn, bytes received in this turn]
        self.closed = collections.Counter()  # why connections were closed: idle, slow, evicted, refused
        self.timer = None

    @classmethod
    def from_env(cls) -> "Guard":
        env = os.environ
        return cls(int(env.get("SERVE_MAX_CONNECTIONS", 256)), float(env.get("SERVE_IDLE_TIMEOUT_S", 5)),
                   float(env.get("SERVE_READ_TIMEOUT_S", 5)))

    @staticmethod
    def server_owes(proto) -> bool:
        """The whole request is in and the answer is not out yet: the server's turn, never timed."""
        cycle = proto.cycle
        return cycle is not None and not cycle.response_complete and not cycle.more_body

    def add(self, proto) -> None:
        self.conns[proto] = [time.monotonic(), 0]
        if self.timer is None:
            self.tick(proto.loop)
        if len(self.conns) > self.max_connections:
            waiting = [p for p in self.conns if p is not proto and not self.server_owes(p)]
            if waiting:  # the longest client turn makes room for the newcomer
                victim = min(waiting, key=lambda p: self.conns[p][0])
                self.close(victim, "evicted")
            else:
                self.close(proto, "refused")

    def activity(self, proto, n: int) -> None:
        if proto in self.conns:
            self.conns[proto][1] += n

    def new_turn(self, proto) -> None:
        if proto in self.conns:
            self.conns[proto] = [time.monotonic(), 0]

    def discard(self, proto) -> None:
        self.conns.pop(proto, None)

    def close(self, proto, why: str) -> None:
        self.closed[why] += 1
        self.conns.pop(proto, None)
        transport = proto.transport
        if why == "slow" and (proto.cycle is None or not proto.cycle.response_started):
            transport.write(TIMEOUT_408)
        if proto.cycle is not None and not proto.cycle.response_complete:
            proto.cycle.keep_alive = False
        transport.close()

    def tick(self, loop) -> None:
        """Every fraction of the shortest timeout: close what has had the client's turn too long."""
        now = time.monotonic()
        for proto, (since, received) in list(self.conns.items()):
            if self.server_owes(proto) or proto.transport.is_closing():
                continue
            if received == 0 and now - since > self.idle_timeout_s:
                self.close(proto, "idle")
            elif received and now - since > self.read_timeout_s:
                self.close(proto, "slow")
        interval = min(1.0, max(0.05, min(self.idle_timeout_s, self.read_timeout_s) / 4))
        self.timer = loop.call_later(interval, self.tick, loop)


GUARD: Guard | None = None


def guard() -> Guard:
    global GUARD
    if GUARD is None:
        GUARD = Guard.from_env()
    return GUARD


class GuardMixin:
    """Hooks the guard into a uvicorn protocol class; behaviour is otherwise uvicorn's own."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        guard().add(self)

    def data_received(self, data: bytes) -> None:
        guard().activity(self, len(data))
        super().data_received(data)

    def on_response_complete(self) -> None:
        guard().new_turn(self)  # the next request's clock starts now
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        guard().discard(self)
        super().connection_lost(exc)


class H11(GuardMixin, H11Protocol):
    """uvicorn's pure-Python HTTP/1.1 protocol (h11), guarded."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: only the h11 class exists
    HttpToolsProtocol = None
else:

    class HttpTools(GuardMixin, HttpToolsProtocol):
        """uvicorn's httptools protocol (the C parser of uvicorn[standard]), guarded."""
