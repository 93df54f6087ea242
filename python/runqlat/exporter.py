"""The HTTP server of /metrics: the port, its bounds against hostile clients,
and the WSGI app that answers with a metrics.Collector's page.

Apart from metrics.py (numpy, prometheus_client) so that a start binds the
port before it loads anything (a port in use fails fast and alone) without
importing what the collector needs, which it imports during the first
interval (cli._run).
"""
from __future__ import annotations

import errno as _errno
import gzip
import logging
import os
import socket
import sys
import threading
import time
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from urllib.parse import parse_qs
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

from . import escape
from .errors import InputError, RunqlatError, os_error_for

if TYPE_CHECKING:
    from .metrics import Collector

log = logging.getLogger("runqlat")


def parse_addr(addr: str) -> tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' (loopback)."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise InputError(f"--metrics-addr {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9435") from None
    if not 0 < p < 65536:
        raise InputError(f"--metrics-addr {addr!r}: port {p} is out of range")
    return host, p



# The exporter listens where anyone on the network (or the host) may connect.
# A connection holds a thread and a file descriptor, so both are bounded, and
# what is left of the process's descriptors stays for the tracer itself: a
# flood of idle connections must never make the tracer fail to open /proc.
MAX_CONNECTIONS = 64
FD_RESERVE = 64           # descriptors kept free for the tracer, beyond those open at start
IDLE_TIMEOUT_S = 10.0     # a client silent this long (reading its request or our answer) is dropped
EVICT_AFTER_S = 0.25      # a full server drops a client still sending its request after this long
MAX_CONNECTION_S = 60.0   # ... or any client connected this long
LISTEN_BACKLOG = 128      # a burst of scrapers queues in the kernel instead of waiting a second
EMFILE_PAUSE_S = 0.1      # out of descriptors: accept nothing for this long instead of spinning


def fd_budget(reserve: int = FD_RESERVE, most: int = MAX_CONNECTIONS) -> int:
    """Connections this process can hold and still have `reserve` descriptors
    free beyond those open now (at least one: the exporter must answer)."""
    import resource
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    if soft == resource.RLIM_INFINITY:
        return most
    return max(1, min(most, soft - in_use - reserve))


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False  # close() does not wait for clients that do not read
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def server_activate(self):
        super().server_activate()
        self.max_connections = fd_budget()
        self._conns: dict = {}  # socket -> [connected at (monotonic), still reading the request]
        self._conns_lock = threading.Lock()
        self._emfile_logged = False
        self._refusing = False

    def get_request(self):
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM):
                if not self._emfile_logged:
                    self._emfile_logged = True
                    log.warning("metrics: cannot accept a connection (%s); refusing until descriptors "
                                "are free", exc.strerror)
                time.sleep(EMFILE_PAUSE_S)  # the listening socket stays readable: do not spin
            raise

    def process_request(self, request, client_address):
        now = time.monotonic()
        with self._conns_lock:
            full = len(self._conns) >= self.max_connections and not self._evict_one(now)
            if not full:
                self._conns[request] = [now, True]
        if full:
            if not self._refusing:  # once per spell of refusals, not once per connection
                self._refusing = True
                log.debug("metrics: %d connections open (the most for this process's descriptor "
                          "limit); refusing more until one ends", self.max_connections)
            self.shutdown_request(request)
            return
        self._refusing = False
        self._emfile_logged = False
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._conns_lock:
                self._conns.pop(request, None)
            raise

    def _evict_one(self, now: float) -> bool:
        """Make room by dropping the oldest client that is slow (still sending its
        request after EVICT_AFTER_S) or has been connected too long. A scraper
        sends its request at once, so it is never the one dropped."""
        slow = [(t, s) for s, (t, reading) in self._conns.items()
                if (reading and now - t > EVICT_AFTER_S) or now - t > MAX_CONNECTION_S]
        if not slow:
            return False
        _, sock = min(slow, key=lambda ts: ts[0])
        del self._conns[sock]
        try:
            sock.shutdown(socket.SHUT_RDWR)  # its thread's recv/send returns; that thread closes it
        except OSError:
            pass
        return True

    def request_read(self, request) -> None:
        with self._conns_lock:
            entry = self._conns.get(request)
            if entry is not None:
                entry[1] = False

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # a client that went silent or away: not news
            log.debug("metrics client %s: %s", client_address[0], exc.strerror or type(exc).__name__)
            return
        super().handle_error(request, client_address)  # a bug: keep its traceback


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Answer(ServerHandler):
    def log_exception(self, exc_info):
        if isinstance(exc_info[1], OSError):  # the client stopped reading: one debug line
            log.debug("metrics client: %s", exc_info[1].strerror or type(exc_info[1]).__name__)
            return
        super().log_exception(exc_info)


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT_S  # each read or write: an idle client must not hold a thread

    def log_message(self, *args):  # scrapes are not news
        pass

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.request_read(self.request)  # from now on a scraper, not a slow sender
        return ok

    def handle(self):
        """WSGIRequestHandler.handle, answering through _Answer (a client gone
        while we answer is one debug line, not a traceback on stderr)."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = _Answer(self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=False)
        handler.request_handler = self
        handler.run(self.server.get_app())


_request = threading.local()


def filtered_scrape() -> bool:
    """Whether the scrape being answered (in this thread) asked for some families
    only (`?name[]=...`): it must not take what the full scrape is owed."""
    return getattr(_request, "filtered", False)


def scrape_client() -> str | None:
    """The host whose scrape is being answered (in this thread): each one is a
    consumer of its own (monitor.Monitor.scrape_snapshot)."""
    return getattr(_request, "client", None)


def _note_filter(app):
    def noted(wsgi_env, start_response):
        _request.filtered = "name[]" in parse_qs(wsgi_env.get("QUERY_STRING", ""))
        _request.client = wsgi_env.get("REMOTE_ADDR") or None
        try:
            return app(wsgi_env, start_response)
        finally:
            _request.filtered = False
            _request.client = None
    return noted


def _one_line_failures(app):
    """A scrape that fails on a library or OS error answers 500 and logs one line,
    not a traceback per scrape for as long as the problem lasts; the same problem
    is logged again only after a scrape has worked. Bugs keep their traceback."""
    last = {"error": None}

    def guarded(environ, start_response):
        try:
            out = app(environ, start_response)
        except (RunqlatError, OSError) as exc:
            msg = str(exc) or type(exc).__name__
            if msg != last["error"]:
                last["error"] = msg
                log.warning("metrics scrape failed: %s", msg)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"scrape failed: {msg}\n".encode()]
        last["error"] = None
        return out

    return guarded


def _metrics_app(server: MetricsServer):
    """The WSGI app prometheus_client's make_wsgi_app would be (methods, content
    negotiation, gzip, ?name[]=), writing the page with the server's
    Collector.exposition."""

    def app(request, start_response):
        from prometheus_client.exposition import choose_encoder, gzip_accepted
        method = request.get("REQUEST_METHOD", "GET")
        if method == "OPTIONS":
            start_response("200 OK", [("Allow", "OPTIONS,GET")])
            return [b""]
        if method != "GET":
            start_response("405 Method Not Allowed", [("Allow", "OPTIONS,GET")])
            return [f"# HTTP 405 Method Not Allowed: {escape.excerpt(method, 20)}; use OPTIONS or GET\n".encode()]
        if request.get("PATH_INFO") == "/favicon.ico":
            start_response("200 OK", [])
            return [b""]
        encoder, content_type = choose_encoder(request.get("HTTP_ACCEPT"))
        params = parse_qs(request.get("QUERY_STRING", ""))
        output = server.collector.exposition(encoder, params.get("name[]"))
        headers = [("Content-Type", content_type)]
        if gzip_accepted(request.get("HTTP_ACCEPT_ENCODING")):
            output = gzip.compress(output, compresslevel=1)  # a 30 MB page: level 9 would take seconds
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]

    return app


class MetricsServer:
    """/metrics on HOST:PORT, in a thread; close() stops it.

    The port is bound at construction (so a port in use is reported before
    anything else is set up); serving starts with start() (or at once), with
    the collector given then or here."""

    def __init__(self, addr: str, collector: Collector | None = None, start: bool = True):
        host, port = parse_addr(addr)
        self.collector = collector
        app = _note_filter(_one_line_failures(_metrics_app(self)))
        cls = _V6Server if ":" in host else _Server
        try:
            self.httpd = make_server(host, port, app, server_class=cls, handler_class=_QuietHandler)
        except OSError as exc:  # socket.gaierror included
            raise os_error_for("listen", exc, "--metrics-addr", addr, host=host, port=port) from None
        self.address = f"{host}:{self.httpd.server_port}" if ":" not in host else f"[{host}]:{self.httpd.server_port}"
        self._thread = None
        self._closed = False
        if start:
            self.start()

    def start(self, collector: Collector | None = None) -> None:
        if collector is not None:
            self.collector = collector
        if self.collector is None:
            raise RuntimeError("MetricsServer.start: no collector to serve")
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
