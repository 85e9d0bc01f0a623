"""Where a run reads validation shards from and writes its files to, checked up front."""

from pathlib import Path

from pipeline import PipelineError, expand_urls, read_manifest, schema
from pipeline.sources import shard_folder

from . import UserError


def prepare_run_folder(out: Path, *, resume: bool, rank: int) -> None:
    """Create OUT and prove it is writable; refuse to overwrite a run unless resuming."""
    probe = out / f".write-test-{rank}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"run folder {out} is not writable: {err.strerror or err}") from None
    if resume and not (out / "last.pt").exists():
        raise UserError(f"--resume: {out / 'last.pt'} does not exist (nothing to resume)")
    if not resume and (out / "last.pt").exists():
        raise UserError(f"run folder {out} already holds a run (last.pt): pass --resume or choose another --out")


def _val_names_in(manifest: dict) -> list[str]:
    """Validation shard names in a converter manifest (its "shards" list or name -> entry map)."""
    shards = manifest.get("shards", {})
    entries = shards.items() if isinstance(shards, dict) else ((entry["name"], entry) for entry in shards)
    return [name for name, entry in entries if entry.get("split") == schema.VAL_SPLIT]


def find_val_shards(train_urls: list[str], val_pattern: str | None, storage_options) -> list[str]:
    """--val-shards if given (must match), else the val-*.tar beside the training shards, else [].

    train_urls are the expanded training shards; the manifest beside the first one names the
    validation shards. Without a manifest, a folder with no val-*.tar means no validation, but
    a folder that cannot be listed (unreachable store, bad credentials) raises PipelineError.
    """
    if val_pattern:
        return expand_urls(val_pattern, storage_options)
    folder = shard_folder(train_urls[0])
    manifest = read_manifest(train_urls[0], storage_options)
    if manifest:
        return [f"{folder}/{name}" for name in _val_names_in(manifest)]
    pattern = f"{folder}/{schema.VAL_PREFIX}-*.tar"
    try:
        return expand_urls(pattern, storage_options)
    except PipelineError as error:
        # A listing failure carries the store's error as its cause; "matches nothing" has none.
        if error.__cause__ is None:
            return []
        raise PipelineError(f"looking for validation shards {pattern}: {error} "
                            "(pass --val-shards, or --no-val to train without validation)") from error
