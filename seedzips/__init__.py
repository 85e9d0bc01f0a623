"""The write side: seed-layout zips in, WebDataset tar shards out.

    index      read each zip's central directory and pair composite, mask and depth by key
    tarwriter  deterministic ustar shards, written by several processes at once
    synthetic  a seed-layout dataset made from code (tests, demo, benchmarks), in two styles:
               scenes + surfaces + objects (photo-like: ray-cast scenes, shaded objects on
               the ground) or simple (flat shapes on colour noise); textures holds their noise
    errors     ConvertError, the one-line problems the converter reports

convert_zips.py is the command line. Nothing here imports torch; the only thing shared with
the read side (pipeline/) is pipeline.schema, the sample contract.
"""
