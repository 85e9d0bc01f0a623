"""The read side: shards (local or any fsspec URL) to decoded batches, augmented on the device.

    from pipeline import make_loader
    loader = make_loader("shards/batch-{1..20}.tar", batch_size=64, workers=4, epoch=e)
    for batch in loader:           # a Batch: bg, bgfg, mask, depth (uint8), key; aug (train: draws)
        images = batch.to("cuda")  # floats on the device, the augmentation applied there

See pipeline.loader.make_loader for the batch format and the guarantees, pipeline.augment for
the augmentation. pipeline.schema is the sample contract shared with the write side (seedzips/).
"""

# Exports load on first use (PEP 562): the write side imports pipeline.schema and must
# not pay for importing torch.
_EXPORTS = {
    "Batch": "pipeline.augment",
    "close_clients": "pipeline.clients",
    "Loader": "pipeline.loader",
    "LoaderOptions": "pipeline.options",
    "make_loader": "pipeline.loader",
    "Pipeline": "pipeline.loader",
    "PipelineError": "pipeline.errors",
    "expand_urls": "pipeline.sources",
    "read_manifest": "pipeline.sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
