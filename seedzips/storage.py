"""Where the write side reads a dataset and writes shards: a local folder or any fsspec URL.

A local output folder gets its shards in place, under temporary names renamed when complete,
and manifest.json (complete: false) after each shard. A remote output (s3://, gs://, any
writable fsspec URL) gets each shard written to a local staging folder, uploaded when complete
(an object store's upload is atomic: an object appears whole or not at all), checked for its
size and deleted locally; an unfinished run's progress lives in manifest.json.tmp beside the
shards, and manifest.json is withdrawn before the first byte changes and written last, so a
reader never sees a manifest over a half-written dataset. A re-run keeps what it finds uploaded
whole: size and sha256 read back equal to what the record says.

A remote dataset's zips are indexed by ranged reads of their central directories and, when a
shard is still to be written, downloaded once each to a staging folder that a re-run reuses.
Staging folders are in TMPDIR, named after the URL, and removed once the conversion completes.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

from pipeline import clients, schema
from pipeline.schema import TEMPORARY
from seedzips.errors import ConvertError

PROGRESS = schema.MANIFEST + TEMPORARY  # a remote run's manifest until it is complete
_CENTRAL_DIRECTORY_BLOCK = 1 << 16  # read ahead of zipfile's small seeks and reads, no more


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def staging_folder(url: str, kind: str) -> str:
    """The local folder in TMPDIR where the work for `url` is staged: named after it, so a re-run finds it."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"seedzips-{kind}-{digest}")


class _Location:
    """A local folder (`url` a path) or a URL (`fs` and `path` its fsspec client and path)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.local = clients.is_local(url)
        if self.local:
            self.url = url.removeprefix("file://")
        else:
            self.fs, self.path = clients.client(url, storage_options)


class Source(_Location):
    """A seed-layout dataset, local or remote: listings, reads, and local copies for the writers."""

    def exists(self) -> bool:
        return os.path.isdir(self.url) if self.local else self.fs.isdir(self.path)

    def sizes(self, folder: str) -> dict | None:
        """{file name: bytes} of the files in `folder` (relative to the dataset); None if no such folder."""
        if self.local:
            path = os.path.join(self.url, folder)
            if not os.path.isdir(path):
                return None
            return {name: os.path.getsize(os.path.join(path, name)) for name in os.listdir(path)
                    if os.path.isfile(os.path.join(path, name))}
        try:
            listing = self.fs.ls(join(self.path, folder), detail=True)
        except FileNotFoundError:
            return None
        return {os.path.basename(e["name"].rstrip("/")): e["size"] for e in listing if e["type"] == "file"}

    def open(self, path: str):
        """A binary file of `path` (a name from the index); remote reads are ranged, little read ahead."""
        if self.local:
            return open(path, "rb")
        return self.fs.open(self.fs._strip_protocol(path), "rb", block_size=_CENTRAL_DIRECTORY_BLOCK,
                            cache_type="readahead")

    def local_copies(self, zips: list) -> tuple[list, str]:
        """(local paths of the [(name, path, bytes)] zips, local background folder) for the writers;
        a remote dataset's are downloaded unless an earlier run left them complete."""
        if self.local:
            return [path for _, path, _ in zips], os.path.join(self.url, schema.BG_DIR)
        staging = staging_folder(self.url, "dataset")
        copies = []
        for folder, files in ((schema.ZIP_DIR, [(name, size) for name, _, size in zips]),
                              (schema.BG_DIR, sorted((self.sizes(schema.BG_DIR) or {}).items()))):
            os.makedirs(os.path.join(staging, folder), exist_ok=True)
            for name, size in files:
                path = os.path.join(staging, folder, name)
                if not (os.path.isfile(path) and os.path.getsize(path) == size):
                    self._download(join(self.url, folder, name), join(self.path, folder, name), path, size)
                if folder == schema.ZIP_DIR:
                    copies.append(path)
        return copies, os.path.join(staging, schema.BG_DIR)

    def _download(self, url: str, remote: str, path: str, size: int) -> None:
        """`remote` (named `url` to the user) into `path`, whole or not at all."""
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=TEMPORARY)
        os.close(fd)
        try:
            try:
                self.fs.get_file(remote, temporary)
            except OSError as error:
                raise ConvertError(f"cannot read {url}: {error.strerror or error}") from None
            if os.path.getsize(temporary) != size:
                raise ConvertError(f"{url} changed size during the conversion")
            os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)

    def done(self) -> None:
        """The conversion is complete: a remote dataset's local copies are no longer needed."""
        if not self.local:
            shutil.rmtree(staging_folder(self.url, "dataset"), ignore_errors=True)


class Target(_Location):
    """An output folder or URL: shards published, records read and written, files checked."""

    def __init__(self, out: str, storage_options: dict | None = None):
        super().__init__(out, storage_options)
        self.staging = self.url if self.local else staging_folder(self.url, "shards")

    def prepare(self) -> None:
        """Make the folders; delete the shards an interrupted run left half-written locally."""
        if not self.local:
            self.fs.makedirs(self.path, exist_ok=True)
        os.makedirs(self.staging, exist_ok=True)
        self.remove_temporaries()

    def remove_temporaries(self) -> None:
        prefixes = tuple(f"{prefix}-" for prefix in (schema.TRAIN_PREFIX, schema.VAL_PREFIX)) + (schema.MANIFEST,
                                                                                           schema.BACKGROUNDS)
        for name in os.listdir(self.staging):
            if name.startswith(prefixes) and name.endswith(TEMPORARY):
                os.remove(os.path.join(self.staging, name))

    def read_record(self) -> dict | None:
        """The manifest of the last run (a remote run's progress first), or None."""
        for name in (schema.MANIFEST,) if self.local else (PROGRESS, schema.MANIFEST):
            try:
                if self.local:
                    with open(os.path.join(self.url, name), "rb") as f:
                        data = f.read()
                else:
                    data = self.fs.cat_file(join(self.path, name))
                return json.loads(data)
            except (FileNotFoundError, ValueError):
                continue
        return None

    def write_file(self, name: str, data: bytes) -> None:
        """`name` at the output holds `data`, whole or not at all (a local temporary renamed, an upload)."""
        if self.local:
            schema.write_durably(os.path.join(self.url, name), data)
        else:
            self.fs.pipe_file(join(self.path, name), data)

    def write_index(self, name: str, data: bytes) -> None:
        self.write_file(schema.index_name(name), data)

    def write_progress(self, record: dict) -> None:
        self.write_file(schema.MANIFEST if self.local else PROGRESS, _json(record))

    def withdraw_manifest(self) -> None:
        """Before anything changes: no reader may take the old manifest for what is there."""
        if not self.local and self.fs.exists(join(self.path, schema.MANIFEST)):
            self.fs.rm_file(join(self.path, schema.MANIFEST))

    def write_manifest(self, record: dict) -> None:
        """The complete manifest, last; a remote progress record is then removed."""
        if self.local:
            self.write_file(schema.MANIFEST, _json(record))
            return
        self.write_file(PROGRESS, _json(record))  # a kill before the next line finds everything done
        self.write_file(schema.MANIFEST, _json(record))
        self.fs.rm_file(join(self.path, PROGRESS))
        shutil.rmtree(self.staging, ignore_errors=True)

    def publish(self, temporary: str, name: str, size: int) -> None:
        """The complete shard in `temporary` (in the staging folder) becomes `name` at the output."""
        if self.local:
            schema.replace_durably(temporary, os.path.join(self.url, name))
            return
        remote = join(self.path, name)
        self.fs.put_file(temporary, remote)
        uploaded = self.fs.info(remote)["size"]
        if uploaded != size:
            raise OSError(f"{join(self.url, name)} has {uploaded} bytes after its upload of {size}")
        os.remove(temporary)

    def intact(self, name: str, size, sha256) -> bool:
        """Whether `name` is at the output with this size and sha256 (read back in full)."""
        if self.local:
            path = os.path.join(self.url, name)
            return os.path.isfile(path) and os.path.getsize(path) == size and sha256_of(path) == sha256
        remote = join(self.path, name)
        try:
            if self.fs.info(remote)["size"] != size:
                return False
            with self.fs.open(remote, "rb", block_size=1 << 23, cache_type="readahead") as f:
                return hashlib.file_digest(f, "sha256").hexdigest() == sha256
        except FileNotFoundError:
            return False

    def remove(self, name: str) -> None:
        if self.local:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.url, name))
        elif self.fs.exists(join(self.path, name)):
            self.fs.rm_file(join(self.path, name))


def _json(record: dict) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
