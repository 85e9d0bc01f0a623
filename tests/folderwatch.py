"""A folder watched from outside the processes using it: its bytes sampled, and every file
removed while a process held it open, from the kernel's own account (inotify)."""

import collections
import ctypes
import os
import select
import struct
import threading

from pipeline import cachelimit

_LIBC = ctypes.CDLL(None, use_errno=True)
# linux/inotify.h
IN_OPEN, IN_CLOSE_WRITE, IN_CLOSE_NOWRITE, IN_DELETE = 0x20, 0x08, 0x10, 0x200
IN_MOVED_FROM, IN_MOVED_TO, IN_Q_OVERFLOW, IN_CLOEXEC = 0x40, 0x80, 0x4000, 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded


class FolderWatch:
    """What happens in a folder, seen from outside the processes using it: at least every 50 ms
    its bytes (`sizes`), and from inotify's events (opens, closes, renames, deletes, in the
    order the kernel saw them, for every process) each file removed while a process held it
    open (`removed_while_open`). `looks` counts the looks taken, shared with forked processes."""

    def __init__(self, folder, context):
        self.folder, self.sizes, self.removed_while_open, self.overflowed = str(folder), [], [], False
        self.looks = context.Value("q", 0, lock=False)
        os.makedirs(self.folder, exist_ok=True)
        self.fd = _LIBC.inotify_init1(IN_CLOEXEC)
        mask = IN_OPEN | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
        assert self.fd >= 0 and _LIBC.inotify_add_watch(self.fd, self.folder.encode(), mask) >= 0, ctypes.get_errno()
        self.open_count, self.moving = collections.Counter(), {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _events(self, data: bytes):
        at = 0
        while at < len(data):
            _, mask, cookie, size = _EVENT.unpack_from(data, at)
            name = data[at + _EVENT.size:at + _EVENT.size + size].rstrip(b"\0").decode()
            at += _EVENT.size + size
            yield mask, cookie, name

    def _take(self, data: bytes) -> None:
        for mask, cookie, name in self._events(data):
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
            elif mask & IN_OPEN:
                self.open_count[name] += 1
            elif mask & (IN_CLOSE_WRITE | IN_CLOSE_NOWRITE):
                self.open_count[name] -= 1
            elif mask & IN_MOVED_FROM:
                self.moving[cookie] = self.open_count.pop(name, 0)
            elif mask & IN_MOVED_TO:
                self.open_count[name] = self.moving.pop(cookie, 0)
            elif mask & IN_DELETE and self.open_count[name] > 0:
                self.removed_while_open.append(name)

    def _run(self):
        while not self.done.is_set():
            if select.select([self.fd], [], [], 0.05)[0]:
                self._take(os.read(self.fd, 1 << 20))
            self.sizes.append(cachelimit.bytes_under(self.folder))
            self.looks.value += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.done.set()
        self.thread.join()
        while select.select([self.fd], [], [], 0)[0]:  # what happened up to the end
            self._take(os.read(self.fd, 1 << 20))
        os.close(self.fd)
