"""Streaming shards (local or any fsspec URL) to decoded, augmented training batches.

    from pipeline import make_loader
    loader = make_loader("shards/batch-{1..20}.tar", batch_size=64, workers=4, epoch=e)
    for batch in loader: ...   # bg, bgfg, mask, depth (uint8), key

See pipeline.loader.make_loader for the batch format and the guarantees.
"""

from pipeline.errors import PipelineError
from pipeline.loader import Loader, make_loader
from pipeline.sources import expand_urls, read_manifest

__all__ = ["Loader", "PipelineError", "expand_urls", "make_loader", "read_manifest"]
