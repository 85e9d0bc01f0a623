"""Where a run reads validation shards from and writes its files to, checked up front."""

from pathlib import Path

from pipeline import PipelineError, expand_urls, read_manifest, schema

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


def _folder_of(url: str) -> str:
    head, sep, _ = url.rpartition("/")
    return head if sep else "."


def _val_names_in(manifest: dict) -> list[str]:
    """Validation shard names listed in a converter manifest, in its order."""
    return [entry["name"] for entry in manifest.get("shards", []) if entry.get("split") == "val"]


def find_val_shards(train_pattern: str, val_pattern: str | None, storage_options) -> list[str]:
    """--val-shards if given (must match), else the val-*.tar beside the training shards, else []."""
    if val_pattern:
        return expand_urls(val_pattern)
    folder = _folder_of(expand_urls(train_pattern)[0])
    manifest = read_manifest(folder, storage_options)
    if manifest:
        names = _val_names_in(manifest)
        return [f"{folder}/{name}" for name in names]
    try:
        return expand_urls(f"{folder}/{schema.VAL_PREFIX}-*.tar")
    except (PipelineError, OSError):  # no match, or a store that cannot list (plain HTTP)
        return []
