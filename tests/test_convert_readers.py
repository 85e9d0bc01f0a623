"""Stock readers on both shard set formats: GNU tar, stock webdataset, HF datasets (local files
only) read every tar of a set, backgrounds.tar included, and the README's webdataset join of a
compact sample to its background gives the self-contained sample."""

import json
import os
import re
import subprocess

import webdataset

from helpers import ROOT
from pipeline import schema
from test_convert import _backgrounds, _format, _read_shard, _samples, converted, shard_sets  # noqa: F401


def _tars(out) -> list:
    """Every tar of a set, backgrounds.tar included, as {name: {key: {suffix: bytes}}}."""
    tars = _samples(out)
    if _format(out) == schema.COMPACT:
        tars[schema.BACKGROUNDS] = {key: {schema.BG: data} for key, data in _backgrounds(out).items()}
    return tars


def test_stock_webdataset_and_gnu_tar_read_every_tar(converted):
    _, out = converted
    for name, samples in _tars(out).items():
        path = os.path.join(out, name)
        read = {s["__key__"]: s for s in webdataset.WebDataset(path, shardshuffle=False, empty_check=False)}
        assert read.keys() == samples.keys()
        assert all({suffix: read[k][suffix] for suffix in members} == members for k, members in samples.items())
        listing = subprocess.run(["tar", "-tf", path], check=True, capture_output=True, text=True)
        assert listing.stdout.split() == [n for n, _ in _read_shard(path)]
        assert listing.stderr == ""


def test_hf_datasets_reads_every_tar_from_local_files(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    _, out = converted
    for name, samples in _tars(out).items():
        loaded = datasets.load_dataset("webdataset", data_files={"train": [str(out / name)]}, split="train",
                                       cache_dir=str(tmp_path / "hf" / name))
        suffixes = [c for c in loaded.column_names if not c.startswith("__")]
        for suffix in set(suffixes) & set(schema.IMAGE_MEMBERS):  # the JPEGs' own bytes, not pictures
            loaded = loaded.cast_column(suffix, datasets.Image(decode=False))
        read = {row["__key__"]: row for row in loaded}
        assert read.keys() == samples.keys()
        for key, members in samples.items():
            assert set(suffixes) == set(members)
            for suffix, data in members.items():
                if suffix == schema.META:
                    assert read[key][suffix] == json.loads(data)
                else:
                    assert read[key][suffix]["bytes"] == data


def _readme_join_snippet() -> str:
    """The README's stock-webdataset join: the python block that defines with_backgrounds."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (snippet,) = [block for block in blocks if "def with_backgrounds" in block]
    return snippet


def test_the_readme_s_stock_webdataset_join_gives_the_self_contained_samples(shard_sets, tmp_path, monkeypatch):
    compact_set, whole = shard_sets[schema.COMPACT], shard_sets[schema.SELF_CONTAINED]
    monkeypatch.chdir(tmp_path)
    os.symlink(compact_set, "shards")  # where the README's lines look
    namespace = {}
    exec(_readme_join_snippet(), namespace)  # noqa: S102 (the project's own README)
    for name, samples in _samples(whole).items():
        joined = {s["__key__"]: s for s in namespace["with_backgrounds"](f"shards/{name}")}
        assert joined.keys() == samples.keys()
        for key, members in samples.items():
            assert {suffix: joined[key][suffix] for suffix in members if suffix != schema.META} == \
                {suffix: data for suffix, data in members.items() if suffix != schema.META}
