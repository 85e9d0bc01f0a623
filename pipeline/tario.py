"""A tar stream to samples: consecutive members sharing a key, limited to a sample range."""

import tarfile
from dataclasses import dataclass, field

from pipeline import schema
from pipeline.sources import open_shard


@dataclass
class Sample:
    """One sample's raw members (suffix -> bytes); `error` is set when the shard broke off."""

    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


def read_samples(url: str, start: int, stop: int, storage_options: dict | None = None, *,
                 wanted=schema.IMAGE_MEMBERS, retries: int = 5, retry_wait: float = 1.0):
    """Yield samples number start..stop-1 of a shard, reading only as far as needed.

    Members of samples before `start` are streamed past without being kept, members not in
    `wanted` are skipped. A tar that ends early (or holds fewer samples than `stop`) ends
    with a Sample whose `error` is set, so the caller can report it and go on.
    """
    index, key, current = -1, None, None
    with open_shard(url, storage_options, retries=retries, retry_wait=retry_wait) as stream:
        try:
            # "r|": a pure stream, no seeking, so any sequential source works.
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    tar.members.clear()  # stream mode keeps every header otherwise
                    if not member.isfile():
                        continue
                    member_key, suffix = schema.split_member(member.name)
                    if member_key != key:
                        if current is not None:
                            yield current
                            current = None
                        index, key = index + 1, member_key
                        if index >= stop:
                            return
                        if index >= start:
                            current = Sample(key, url)
                    if current is not None and suffix in wanted:
                        current.members[suffix] = tar.extractfile(member).read()
        except tarfile.TarError as error:
            broken = f"shard ends early after sample {index + 1}: {error}"
        else:
            broken = None if index + 1 >= stop else f"shard holds {index + 1} samples, {stop} expected"
    if current is not None:
        yield current
    if broken is not None:
        yield Sample(key or "", url, error=broken)
