"""Streaming shards (local or any fsspec URL) to decoded batches, augmented on the device.

    from pipeline import make_loader, to_device
    loader = make_loader("shards/batch-{1..20}.tar", batch_size=64, workers=4, epoch=e)
    for batch in loader:       # bg, bgfg, mask, depth (uint8), key; aug (train: the draws)
        images = to_device(batch, "cuda")  # float, augmented on the device

See pipeline.loader.make_loader for the batch format and the guarantees.
"""

# Exports load on first use (PEP 562): the converter and the generator import
# pipeline.schema and must not pay for importing torch.
_EXPORTS = {
    "Loader": "pipeline.loader",
    "make_loader": "pipeline.loader",
    "PipelineError": "pipeline.errors",
    "expand_urls": "pipeline.sources",
    "read_manifest": "pipeline.sources",
    "to_device": "pipeline.device",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
