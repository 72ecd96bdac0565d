"""digitserve's gunicorn worker: gthread, with each request read whole before a thread
takes it, and a stop that serves the connections the kernel has already accepted.

    worker_class = "service.worker.BufferedThreadWorker"   # service/gunicorn.conf.py

Slow clients. gthread hands a connection to a request thread as soon as its first byte
arrives, and the thread then blocks on the socket until the request is complete: 64
clients that send headers and part of a body, then stall, hold every thread of the
server and nobody else is answered. Here the event loop (which already watches every
idle connection) reads the request line, headers and body into a buffer without
blocking; a request reaches a thread only once it is whole, so a thread never waits on
a client. A client that is too slow is answered 408 and closed: HEADER_TIMEOUT for the
whole head, BODY_TIMEOUT between two reads of the body (nginx's client_header_timeout
and client_body_timeout). A body over MAX_CONTENT_LENGTH is not buffered: the app answers
413 at once without reading it. Memory is bounded by BUFFER_BYTES per worker; past it, a
request goes to a thread unbuffered, where a socket timeout (IO_TIMEOUT) still bounds
every read and write. docs/reliability.md has the measurements behind this choice.

Drain. On SIGTERM gthread stops watching its listening socket, finishes what it has and
closes the socket at the end: connections the kernel had queued meanwhile (the listen
backlog) were reset. Here the queue is accepted to its end first, the socket closed at
once (new connections are refused, not queued), and what was accepted is served.

Balance. The workers share the listening socket, and one accepts a new connection only
if no other ready worker holds fewer (service/balancing.py): the kernel alone split
kept-alive connections 31/1 on a shared socket, 10/22 over SO_REUSEPORT sockets.

Start-up. With one listening socket per worker (SO_REUSEPORT, an option) gunicorn binds
a new worker's socket right after the fork, so the kernel queues connections on it while
the model loads; here a worker binds only once its model has loaded.

It runs to about 550 lines because it replaces one loop of gthread's whole: the
buffering, its limits and the drain share that loop's state and read best together.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import gunicorn.sock
from gunicorn.http.body import LengthReader
from gunicorn.workers.gthread import TConn, ThreadWorker

from service.balancing import WorkerSlot


class TimeoutSocket(socket.socket):
    """A client socket on which "blocking" means "blocking for ``io_timeout`` at most".

    gthread sets a connection blocking before a thread reads or writes it; a read that
    times out ends like a client that went away (EOF), a write like a broken pipe, so
    gunicorn closes the connection quietly instead of logging a traceback.
    """

    __slots__ = ("io_timeout",)
    io_timeout: float

    def setblocking(self, flag: bool) -> None:
        # Only on a change: gthread asks again for the mode the socket is already in, and
        # each call is an ioctl that lets go of the GIL (5 a request, 2 of them needed).
        wanted = self.io_timeout if flag else 0.0
        if self.gettimeout() != wanted:
            self.settimeout(wanted)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            return super().recv(bufsize, flags)
        except TimeoutError:  # only with a timeout set: the client said nothing for that long
            return b""

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        try:
            return super().recv_into(buffer, nbytes, flags)
        except TimeoutError:
            return 0

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except TimeoutError:
            raise BrokenPipeError(errno.EPIPE, "client stopped reading") from None

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        sent = 0
        if not flags and self.gettimeout():
            # Most responses fit the socket's buffer: written at once, without the poll()
            # CPython makes before each send with a timeout (a system call, a GIL hand-off).
            with contextlib.suppress(BlockingIOError):
                sent = os.write(self.fileno(), view)
        if sent == len(view):
            return
        try:
            super().sendall(view[sent:], flags)
        except TimeoutError:
            raise BrokenPipeError(errno.EPIPE, "client stopped reading") from None


def error_bytes(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole response in the API's error shape, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Framing:
    """Where a request buffered so far ends: ``end`` once known (None: read on), or
    ``dispatch`` when the rest is for gunicorn's parser to judge (a malformed head, a
    declared body over the limit). Scans incrementally: each call looks at new bytes."""

    def __init__(self, max_head: int, max_body: int):
        self.max_head, self.max_body = max_head, max_body
        self.head_end: int | None = None  # index after the blank line
        self.end: int | None = None
        self.dispatch = False
        self.expect_continue = False
        self.chunked = False
        self._scan = 0  # where the next search starts
        self._chunk_pos = 0  # chunked: start of the next chunk-size line

    def shift(self, removed: int) -> None:
        """``removed`` bytes were taken out of the head (the Expect header)."""
        assert self.head_end is not None
        self.head_end -= removed
        if self.chunked:
            self._chunk_pos -= removed
        if self.end is not None:
            self.end -= removed

    def feed(self, buf: bytearray) -> None:
        if self.head_end is None:
            found = buf.find(b"\r\n\r\n", max(0, self._scan - 3))
            if found < 0:
                self._scan = len(buf)
                if len(buf) > self.max_head:
                    self.dispatch = True  # gunicorn answers 431/414/400
                return
            self.head_end = found + 4
            self._parse_head(bytes(buf[: self.head_end]))
            if self.dispatch or self.end is not None:
                return
        if self.chunked:
            self._feed_chunked(buf)
        # Content-Length: `end` is already known; the caller compares len(buf) to it.

    def _parse_head(self, head: bytes) -> None:
        assert self.head_end is not None
        lines = head[:-4].split(b"\r\n")
        while lines and not lines[0]:  # blank lines before a request line are allowed
            lines.pop(0)
        if not lines:
            self.dispatch = True
            return
        http11 = lines[0].rstrip().endswith(b"HTTP/1.1")
        lengths, codings = [], []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                self.dispatch = True  # gunicorn refuses a header line without a colon
                return
            name_l = name.strip().lower()
            if name_l == b"content-length":
                lengths.append(value.strip())
            elif name_l == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b","))
            elif name_l == b"expect" and value.strip().lower() == b"100-continue" and http11:
                self.expect_continue = True
        if codings:
            if lengths or codings[-1] != b"chunked":
                self.dispatch = True  # ambiguous or unsupported framing: gunicorn refuses it
                return
            self.chunked = True
            self._chunk_pos = self.head_end
            return
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            self.dispatch = True
            return
        length = int(lengths[0]) if lengths else 0
        if length > self.max_body:
            self.dispatch = True  # the app answers 413 without reading the body
            self.expect_continue = False
            return
        self.end = self.head_end + length
        if length == 0:
            self.expect_continue = False

    def _feed_chunked(self, buf: bytearray) -> None:
        pos = self._chunk_pos
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                if len(buf) - pos > 1024:  # a chunk-size line longer than any real one
                    self.dispatch = True
                return
            size_field = bytes(buf[pos:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                self.dispatch = True
                return
            if size == 0:  # the last chunk, then trailer lines up to a blank one
                trailers_end = buf.find(b"\r\n\r\n", line_end)
                if trailers_end >= 0:
                    self.end = trailers_end + 4
                self._chunk_pos = pos
                return
            next_pos = line_end + 2 + size + 2
            if next_pos - (self.head_end or 0) > self.max_body + 64 * 1024:
                self.dispatch = True  # werkzeug answers 413 as it reads past the limit
                return
            if next_pos > len(buf):
                self._chunk_pos = pos
                return
            pos = next_pos
            self._chunk_pos = pos


@dataclass
class Reading:
    """A connection whose request is being buffered by the event loop."""

    conn: TConn
    framing: Framing
    head_deadline: float
    buf: bytearray = field(default_factory=bytearray)
    body_deadline: float = 0.0
    continued: bool = False


class BufferedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker, reading each request whole in its event loop."""

    # Set by service/gunicorn.conf.py (``configure``); class attributes are inherited by
    # the forked workers.
    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 10.0
    io_timeout: ClassVar[float] = 30.0
    max_body: ClassVar[int] = 10 * 1024 * 1024
    buffer_bytes: ClassVar[int] = 64 * 1024 * 1024
    _SCAN_EVERY = 0.2  # seconds between two looks for expired reads
    # A worker holding more connections than another leaves a new one to it for this
    # long, and for _YIELD_AT_MOST in a row at most: the other may be stuck.
    _YIELD_FOR = 0.001
    _YIELD_AT_MOST = 0.02

    @classmethod
    def configure(
        cls,
        *,
        header_timeout: float,
        body_timeout: float,
        io_timeout: float,
        max_body: int,
        buffer_bytes: int,
    ) -> None:
        cls.header_timeout, cls.body_timeout, cls.io_timeout = (
            header_timeout,
            body_timeout,
            io_timeout,
        )
        cls.max_body, cls.buffer_bytes = max_body, buffer_bytes

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reading: dict[int, Reading] = {}  # id(conn) -> state
        self.buffered = 0  # bytes held in all the Reading buffers
        self._next_scan = 0.0
        self._max_head = (
            self.cfg.limit_request_line
            + self.cfg.limit_request_fields * (self.cfg.limit_request_field_size + 2)
            + 4
        )
        # Set by gunicorn.conf.py's pre_fork: this worker's slot among the workers sharing
        # the listening socket (service/balancing.py); None: accept as gthread does.
        self.slot: WorkerSlot | None = None
        self._paused_until = 0.0
        self._yielding_since: float | None = None

    # ---- start-up: bind once the model has loaded ----------------------------------
    def run(self) -> None:
        if not self.sockets and deferred_bind_applies(self.cfg):
            self.sockets = create_sockets(self.cfg, self.log)
        try:
            super().run()
        finally:
            flush_access = getattr(self.log, "flush_access", None)
            if flush_access is not None:  # the last buffered access lines
                flush_access()

    # ---- least connections: who accepts from the shared socket --------------------------
    def notify(self) -> None:
        """Each turn of the event loop: the heartbeat, access lines due out, and this
        worker's connections."""
        super().notify()
        flush_due = getattr(self.log, "flush_due", None)
        if flush_due is not None:  # service.gunicorn_ext.AccessLogger's buffered lines
            flush_due()
        if self.slot is not None:
            self.slot.publish(self.nr_conns if self.alive else -1)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.slot is not None:
            self.slot.publish(-1)
        super().handle_exit(sig, frame)

    def _leave_to_another(self) -> bool:
        """Whether a worker with fewer connections should take the one queued: if so,
        stop watching the socket for _YIELD_FOR."""
        if self.slot is None:
            return False
        fewest = self.slot.fewest_elsewhere()
        if fewest is None or fewest >= self.nr_conns:
            return False
        now = time.monotonic()
        if self._yielding_since is None:
            self._yielding_since = now
        elif now - self._yielding_since > self._YIELD_AT_MOST:
            return False
        self._paused_until = now + self._YIELD_FOR
        super().set_accept_enabled(False)
        return True

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        pause = self._paused_until - time.monotonic()
        super().wait_for_and_dispatch_events(min(timeout, pause) if pause > 0 else timeout)

    # ---- reading requests in the event loop -----------------------------------------
    def accept(self, listener: Any) -> None:
        if self._leave_to_another():
            return
        try:
            client, address = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self._yielding_since = None
        self._adopt(client, address, listener.getsockname())

    def _adopt(self, client: socket.socket, address: Any, server: Any) -> None:
        sock = TimeoutSocket(client.family, client.type, client.proto, fileno=client.detach())
        sock.io_timeout = self.io_timeout
        self.nr_conns += 1
        if self.slot is not None:  # at once: the others' next choice must count this one
            self.slot.publish(self.nr_conns)
        conn = TConn(self.cfg, sock, address, server)  # sets it non-blocking
        self._start_reading(conn)

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        """A kept-alive connection has a next request coming: buffer it too. It stays
        registered, with a new callback: no system call (the socket is non-blocking)."""
        self.keepalived_conns.remove(conn)
        state = self._reading(conn)
        self.poller.modify(client, selectors.EVENT_READ, partial(self._on_readable, state))
        self._on_readable(state, client)

    def _start_reading(self, conn: TConn) -> None:
        state = self._reading(conn)
        conn.sock.setblocking(False)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, state))

    def _reading(self, conn: TConn) -> Reading:
        state = Reading(
            conn,
            Framing(self._max_head, self.max_body),
            head_deadline=time.monotonic() + self.header_timeout,
        )
        self.reading[id(conn)] = state
        return state

    def _on_readable(self, state: Reading, _sock: Any) -> None:
        conn = state.conn
        try:
            data = conn.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away, or stopped sending (a half-close)
            if state.buf.strip():
                self._dispatch(state)  # gunicorn and the app answer what came (400 "cut short")
            else:
                self._drop(state)
            return
        state.buf += data
        self.buffered += len(data)
        state.body_deadline = time.monotonic() + self.body_timeout
        framing = state.framing
        framing.feed(state.buf)
        if framing.dispatch:
            self._dispatch(state)
            return
        if framing.end is not None and len(state.buf) >= framing.end:
            self._dispatch(state)
            return
        if framing.expect_continue and not state.continued:
            self._continue(state)
        if self.buffered > self.buffer_bytes:
            # Past the memory bound: this one reads on in a thread, under IO_TIMEOUT.
            self._dispatch(state)

    def _continue(self, state: Reading) -> None:
        """Answer ``Expect: 100-continue`` here (the client waits for it before sending
        the body) and take the header out, so that gunicorn does not send a second one."""
        state.continued = True
        head_end = state.framing.head_end
        assert head_end is not None
        head = bytes(state.buf[:head_end])
        lines = head.split(b"\r\n")
        kept = [
            line
            for line in lines
            if not (
                line.partition(b":")[0].strip().lower() == b"expect"
                and line.partition(b":")[2].strip().lower() == b"100-continue"
            )
        ]
        new_head = b"\r\n".join(kept)
        state.buf[:head_end] = new_head
        shift = len(head) - len(new_head)
        self.buffered -= shift
        state.framing.shift(shift)
        try:
            state.conn.sock.send(CONTINUE)
        except OSError:
            self._drop(state)

    def _stop_reading(self, state: Reading) -> None:
        self.reading.pop(id(state.conn), None)
        self.buffered -= len(state.buf)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(state.conn.sock)

    def _dispatch(self, state: Reading) -> None:
        self._stop_reading(state)
        conn = state.conn
        conn.digitserve_buffered = bytes(state.buf)  # type: ignore[attr-defined]
        conn.data_ready = True
        self.enqueue_req(conn)

    def _drop(self, state: Reading, answer: bytes = b"") -> None:
        self._stop_reading(state)
        if answer:
            with contextlib.suppress(OSError):  # small: fits the socket buffer, or is lost
                state.conn.sock.send(answer)
        self.nr_conns -= 1
        state.conn.close()

    def handle(self, conn: TConn) -> Any:
        """In a request thread: hand the buffered bytes to gunicorn's parser first."""
        data = conn.__dict__.pop("digitserve_buffered", None)
        if data is not None:
            conn.sock.setblocking(True)
            conn.init()  # the parser, for a first request
            conn.parser.unreader.unread(data)
        return super().handle(conn)

    def _keepalive_after(self, conn: TConn, keepalive: bool) -> bool:
        """gthread drains what the app left of the body under a timeout: two timeout
        changes, an ioctl each. A body read to its Content-Length end has nothing left."""
        body = getattr(getattr(conn.parser, "mesg", None), "body", None)
        reader = getattr(body, "reader", None)
        read_whole = isinstance(reader, LengthReader) and reader.length == 0
        if keepalive and read_whole and not body.failed and body.buf.tell() == 0:
            return True
        return super()._keepalive_after(conn, keepalive)

    def murder_pending(self) -> None:
        """Also end the reads that ran out of time (called by both of gthread's loops)."""
        super().murder_pending()
        now = time.monotonic()
        if now < self._next_scan:
            return
        self._next_scan = now + self._SCAN_EVERY
        for state in list(self.reading.values()):
            framing = state.framing
            if framing.head_end is None:
                if now < state.head_deadline:
                    continue
                if not state.buf.strip():  # nothing said: closed like an idle keep-alive
                    self._drop(state)
                    continue
                what = f"the request head took over {self.header_timeout:g} s"
            elif now < state.body_deadline:
                continue
            else:
                what = f"the request body stalled for over {self.body_timeout:g} s"
            self.log.info("408 to %s: %s", _peer(state.conn), what)
            self._drop(state, error_bytes(408, "Request Timeout", "request_timeout", what))

    # ---- drain: serve what the kernel has queued ------------------------------------
    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled and self.alive and time.monotonic() < self._paused_until:
            return  # left to a worker with fewer connections, for now
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            self._drain_backlog()

    def _drain_backlog(self) -> None:
        """Stopping: accept every connection already queued, then close the listening
        sockets, so new ones are refused instead of queued and reset. On a shared
        socket that another worker still serves, the queue is left to it."""
        if self.slot is not None:
            self.slot.publish(-1)
            if self.slot.fewest_elsewhere() is not None:
                for listener in self.sockets:
                    listener.close()
                return
        taken = 0
        for listener in self.sockets:
            if getattr(listener, "sock", listener) is None:
                continue
            listener.setblocking(False)
            while True:
                try:
                    client, address = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno == errno.ECONNABORTED:
                        continue
                    break
                taken += 1
                self._adopt(client, address, listener.getsockname())
            listener.close()
        if taken:
            self.log.info("stopping: serving %d connection(s) from the listen queue", taken)


def _peer(conn: TConn) -> str:
    client = conn.client
    return f"{client[0]}:{client[1]}" if isinstance(client, tuple) else str(client)


# ---- deferred bind: gunicorn binds a reuse_port worker's socket right after the fork ----
_original_create_sockets: Callable[..., list] = gunicorn.sock.create_sockets
_master_pid = os.getpid()


def deferred_bind_applies(cfg: Any) -> bool:
    return bool(cfg.reuse_port) and hasattr(socket, "SO_REUSEPORT")


def create_sockets(cfg: Any, log: Any, fds: Any = None) -> list:
    return _original_create_sockets(cfg, log, fds)


def _create_sockets_in_master_only(cfg: Any, log: Any, fds: Any = None) -> list:
    """gunicorn.sock.create_sockets, except in a just-forked reuse_port worker of
    BufferedThreadWorker, which binds later itself (``run``)."""
    if (
        os.getpid() != _master_pid
        and deferred_bind_applies(cfg)
        and isinstance(cfg.worker_class, type)
        and issubclass(cfg.worker_class, BufferedThreadWorker)
    ):
        return []
    return _original_create_sockets(cfg, log, fds)


def install() -> None:
    """Patch gunicorn.sock.create_sockets (idempotent); gunicorn.conf.py calls this."""
    global _master_pid
    _master_pid = os.getpid()
    gunicorn.sock.create_sockets = _create_sockets_in_master_only
