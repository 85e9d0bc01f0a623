"""A run's validation sources: which shards each one scores, its name, and the total of their scores.

With one validation source (the usual case) its score is the run's validation score. With
several (`--val-shards` repeated, or a val split beside each `--shards` source), each is scored
in a pass of its own and logged under its name (`NAME/iou` ...) beside the total.
"""

import math
import posixpath

from pipeline import expand_urls
from pipeline.sources import shard_folder

from .runfolder import find_val_shards

_ROOT_MEAN_SQUARES = ("rmse", "ssi_rmse")  # per-pixel means under a root: every sample has the same pixels


def _name(urls: list[str], taken: dict) -> str:
    """The folder the source's first shard is in (a number added when two share it)."""
    name = posixpath.basename(shard_folder(urls[0]).rstrip("/")) or "val"
    suffix = 2
    while (name if suffix == 2 else f"{name}-{suffix - 1}") in taken:
        suffix += 1
    return name if suffix == 2 else f"{name}-{suffix - 1}"


def find_val_sources(train_sources: list[list[str]], val_patterns: list[str] | None, storage_options) -> dict:
    """name -> validation shard URLs: each --val-shards pattern, else the validation shards
    beside each training source (runfolder.find_val_shards), the same shards named once."""
    if val_patterns:
        found = [expand_urls(pattern, storage_options) for pattern in val_patterns]
    else:
        found = [find_val_shards(urls, None, storage_options) for urls in train_sources]
    sources: dict[str, list[str]] = {}
    for urls in found:
        if urls and urls not in sources.values():
            sources[_name(urls, sources)] = urls
    return sources


def total(results: dict[str, dict]) -> dict:
    """The sources' scores as one: sample-weighted means (rmse and ssi_rmse as root mean
    squares, so they are exact; iou, dice, abs_rel and delta1 weigh each source by its samples,
    not by its mask or valid pixels), and the samples summed. One source's are its own."""
    if len(results) == 1:
        return dict(next(iter(results.values())))
    scored = [result for result in results.values() if result["samples"]]
    samples = sum(result["samples"] for result in scored)
    out = {}
    for key in next(iter(results.values())):
        if key == "samples":
            out[key] = samples
        elif not samples:
            out[key] = math.nan
        elif key in _ROOT_MEAN_SQUARES:
            out[key] = math.sqrt(sum(r["samples"] * r[key] ** 2 for r in scored) / samples)
        else:
            out[key] = sum(r["samples"] * r[key] for r in scored) / samples
    return out


def by_source(results: dict[str, dict]) -> dict:
    """Each source's scores as NAME/key, for metrics.jsonl and TensorBoard (none with one source)."""
    if len(results) < 2:
        return {}
    return {f"{name}/{key}": value for name, result in results.items() for key, value in result.items()}
