"""The write side: seed-layout zips in, WebDataset tar shards out.

    convert    the converter (convert_zips.py is its command line): plan, resume, manifest
    storage    where it reads and writes: local folders or fsspec URLs (uploads, ranged reads)
    index      read each zip's central directory and pair composite, mask and depth by key
    tarwriter  deterministic ustar shards, written by several processes at once
    synthetic  a seed-layout dataset made from code (tests, demo, benchmarks), in two styles:
               scenes + surfaces + objects (photo-like: ray-cast scenes, shaded objects on
               the ground) or simple (flat shapes on colour noise); textures holds their noise
    compose    a seed-layout dataset from a user's photos and cut-outs (python -m seedzips.compose):
               placement reads them and pastes, depthlabel labels depth with a transformers model,
               composezip composes in worker processes and writes the zips
    errors     ConvertError, the one-line problems the converter and the composer report

convert_zips.py is the command line. Nothing here imports torch but depthlabel, when a labeller
is made; the only thing shared with the read side (pipeline/) is pipeline.schema, the contract.
"""
