"""Loopback HTTP servers that count the bytes they really send, for the tests and benches
that measure what a reader fetches: a file server (Range, keep-alive, optionally ignoring Range
or dropping a connection mid-body) and a TCP proxy for servers that cannot count themselves.
"""

import contextlib
import functools
import http.server
import os
import socket
import sys
import threading

class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """GET and HEAD of files, keep-alive, Range -> 206 with Content-Range (unless the server
    ignores Range); counts the body bytes it writes to the socket, per path."""

    protocol_version = "HTTP/1.1"

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        server = self.server
        path = self.translate_path(self.path.split("?", 1)[0])
        if not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, "rb") as f:
            data = f.read()
        start, end, status = 0, len(data), 200
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and server.ranges:
            first, _, last = ranged.removeprefix("bytes=").partition("-")
            start = int(first)
            end = min(int(last) + 1, len(data)) if last else len(data)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        with server.lock:
            server.requests[self.path] = server.requests.get(self.path, 0) + 1
            server.asked.setdefault(self.path, []).append((start, end))
            drop = server.drop_after is not None and server.requests[self.path] == 1 \
                and end - start > server.drop_after
            if drop:
                server.dropped[self.path] = (start, end)
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        stop = start + server.drop_after if drop else end
        try:
            for at in range(start, stop, 1 << 16):  # counted as written, so an early close stops the count
                chunk = data[at:min(at + (1 << 16), stop)]
                self.wfile.write(chunk)
                with server.lock:
                    server.sent[self.path] = server.sent.get(self.path, 0) + len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if drop:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no news
            super().handle_error(request, client_address)


class CountingServer:
    """A running counting HTTP server: its base `url`, and per path the body bytes `sent`, the
    number of `requests` and the byte range [start, end) each GET or HEAD asked for (`asked`);
    the range of each path whose connection it `dropped`."""

    def __init__(self, server):
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self.sent, self.requests, self.asked, self._lock = server.sent, server.requests, server.asked, server.lock
        self.dropped = server.dropped

    def bytes_sent(self, suffix: str = "") -> int:
        """Body bytes sent so far for paths ending in `suffix` (all paths by default)."""
        with self._lock:
            return sum(count for path, count in self.sent.items() if path.endswith(suffix))

    def reset(self) -> None:
        with self._lock:
            self.sent.clear()
            self.requests.clear()
            self.asked.clear()


@contextlib.contextmanager
def http_server(root, *, ranges: bool = True, drop_after: int | None = None):
    """A threaded HTTP/1.1 server for `root` that counts the body bytes it sends, per path.

    ranges=False: Range headers are ignored (every GET answers 200 with the whole file).
    drop_after=N: the first GET of each path sends N body bytes, then drops the connection.
    Yields a CountingServer.
    """
    handler = functools.partial(_CountingHandler, directory=os.fspath(root))
    server = _QuietServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.lock, server.requests, server.sent, server.asked, server.dropped = threading.Lock(), {}, {}, {}, {}
    server.ranges, server.drop_after = ranges, drop_after
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield CountingServer(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def tcp_proxy(target_url: str, make_filter, on_hold=lambda: None):
    """A TCP proxy on 127.0.0.1 in front of `target_url`'s host and port. For each connection
    and direction, `make_filter(upload)` (upload: client to server) gives a function that sees
    each chunk and returns the bytes to pass on and whether to hold that connection after them,
    passing nothing more until the proxy closes (a transfer caught mid-flight; `on_hold()` is called
    once those bytes are sent). Yields its base URL."""
    target = target_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # accept() wakes up to see `done`: closing it would not wake it
    done = threading.Event()

    def pump(source, sink, chunk_filter):
        try:
            while data := source.recv(1 << 16):
                passed, hold = chunk_filter(data)
                sink.sendall(passed)
                if hold:
                    on_hold()
                    done.wait()
                    return
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def accept():
        while not done.is_set():
            try:
                client, _ = listener.accept()
            except OSError:  # a timeout, or closed: the loop ends
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection((target[0], int(target[1])))
            except OSError:  # the server is down: so is the proxy, to this client
                client.close()
                continue
            threading.Thread(target=pump, args=(client, upstream, make_filter(True)), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, make_filter(False)), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        listener.close()
        thread.join(timeout=10)


@contextlib.contextmanager
def proxy(target_url: str):
    """A TCP proxy on 127.0.0.1 in front of `target_url`'s host and port that counts every byte
    the server sends back (HTTP headers included), for servers that cannot count themselves.

    Yields (the proxy's base URL, a function returning the bytes counted so far).
    """
    lock, sent = threading.Lock(), [0]

    def counted(data: bytes) -> tuple[bytes, bool]:
        with lock:
            sent[0] += len(data)
        return data, False

    def count() -> int:
        with lock:
            return sent[0]

    with tcp_proxy(target_url, lambda upload: (lambda data: (data, False)) if upload else counted) as url:
        yield url, count
