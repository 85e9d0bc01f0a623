"""Raw sample members to uint8 images at the training size, written straight into batch memory,
and the cheap checks that catch broken JPEGs without decoding them.

The decoder is simplejpeg (libjpeg-turbo's TurboJPEG API, bit-identical to torchvision's
decode_jpeg here), chosen over torchvision for three reasons measured in bench/loader.py:
it decodes into a buffer we give it (the batch's shared memory: no copy), it is faster per
call, and in strict mode it raises on what libjpeg only *warns* about ("Corrupt JPEG data:
..."), which torchvision prints to stderr and then returns a damaged image. So a bit-flipped
JPEG is a counted skip like a truncated one, and the reason carries libjpeg's own words.

A JPEG must start with SOI and end with EOI (trailing zero padding allowed) before it is
decoded at all: `check` is what a resumed epoch uses to compose the batches it skips.
Members of another size (a half-size depth map, or all of them when training at a smaller
size) are fitted to the training size. With `scaled` (the default), a member other than the
mask at least twice the training size is first decoded smaller by libjpeg itself, in the DCT
domain (1/2, 1/4 or 1/8 of its sides, the smallest that still covers the training size), which
skips most of the inverse DCT, colour conversion and resizing work; the result is within JPEG
noise of a full-size decode and resize (tests/test_decode_scaled.py states by how much).
"""

import functools
import time

import numpy as np
import simplejpeg
import torch
from torch.nn import functional as nn_functional

from pipeline import schema

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
COLORSPACES = {schema.BG: "RGB", schema.BGFG: "RGB", schema.MASK: "GRAY", schema.DEPTH: "GRAY"}
CHANNELS = {name: 3 if space == "RGB" else 1 for name, space in COLORSPACES.items()}
MASK_THRESHOLD = schema.MASK_THRESHOLD
# libjpeg's DCT-domain reductions with SIMD inverse transforms; its other eighths (3/8, 5/8...)
# are plain C and measured slower than decoding at the next power of two and resizing.
REDUCTIONS = (8, 4, 2)


class BadSample(ValueError):
    """A sample that cannot be used; the message is the reason reported for it."""


def check(members: dict[str, bytes]) -> None:
    """Raise BadSample unless all four image members are present and look like whole JPEGs."""
    for name in schema.IMAGE_MEMBERS:
        data = members.get(name)
        if data is None:
            raise BadSample(f"missing member {name}")
        if not data.startswith(_SOI):
            raise BadSample(f"{name} is not a JPEG")
        if not data.rstrip(b"\0").endswith(_EOI):
            raise BadSample(f"{name} is a truncated JPEG")


def scaled_shape(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """The shape libjpeg decodes a height x width JPEG to at the largest of REDUCTIONS that
    keeps both sides at or above `size` (height, width); the full shape when none does."""
    for factor in REDUCTIONS:
        shape = -(-height // factor), -(-width // factor)  # libjpeg rounds a scaled side up
        if shape[0] >= size[0] and shape[1] >= size[1]:
            return shape
    return height, width


class Decoder:
    """One process's decoder: writes samples into batch memory and times its two stages.

    `seconds` holds the time spent decoding JPEGs and fitting (resizing, thresholding,
    copying a cached background), summed since the decoder was made. scaled: decode a large
    member at a libjpeg reduction (scaled_shape) before fitting; False decodes it whole.
    """

    def __init__(self, size: int, *, scaled: bool = True):
        self.size, self.scaled = size, scaled
        self.seconds = {"decode": 0.0, "fit": 0.0}
        # Backgrounds repeat: the seed dataset composes 2,000 samples on each of its 100, so
        # the last 128 decoded (about 19 MB at 224 px) are kept, keyed by their bytes.
        self._background = functools.lru_cache(maxsize=128)(self._decode_background)

    def decode_into(self, members: dict[str, bytes], out: dict[str, np.ndarray]) -> None:
        """Decode a sample's four images into `out` (name -> C-contiguous uint8 HWC array of
        size x size): bg, bgfg RGB; mask 0/1; depth as luminance (colour-mapped depth works).
        Raises BadSample naming the member when one is missing, truncated or corrupt."""
        check(members)
        background = self._background(members[schema.BG])
        for name in (schema.BGFG, schema.MASK, schema.DEPTH):
            self._decode(name, members[name], out[name])
        decoded = time.perf_counter()
        np.copyto(out[schema.BG], background)
        mask = out[schema.MASK]
        np.greater(mask, MASK_THRESHOLD, out=mask.view(np.bool_))  # 0/1 bytes, in place
        self.seconds["fit"] += time.perf_counter() - decoded

    def _decode_background(self, data: bytes) -> np.ndarray:
        image = np.empty((self.size, self.size, 3), np.uint8)
        self._decode(schema.BG, data, image)
        return image

    def _decode(self, name: str, data: bytes, out: np.ndarray) -> None:
        started = time.perf_counter()
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            # Not the mask: its thin parts (a 2 px stem at 96 px) are where a reduced decode
            # and a nearest-neighbour fit disagree most with one from full size (IoU 0.958 on
            # bench/quality.py's validation masks at 96 px), and they are the targets the
            # model learns and is scored on; a whole grey mask costs 0.04 ms more than half.
            if self.scaled and name != schema.MASK:
                height, width = scaled_shape(height, width, out.shape[:2])
            # min_height/min_width make simplejpeg pick exactly that reduction (none at full size)
            if (height, width) == out.shape[:2]:
                simplejpeg.decode_jpeg(data, COLORSPACES[name], min_height=height, min_width=width, buffer=out)
                self.seconds["decode"] += time.perf_counter() - started
                return
            # A grey JPEG to resize (the depth) is decoded as RGB, libjpeg copying the grey into
            # all three: torch resizes three channels in less time than one (_fit).
            space = "RGB" if colorspace == "Gray" and name != schema.MASK else COLORSPACES[name]
            image = simplejpeg.decode_jpeg(data, space, min_height=height, min_width=width)
        except ValueError as error:  # libjpeg's errors and, in strict mode, its warnings
            raise BadSample(f"{name} does not decode: {str(error).splitlines()[0]}") from None
        fitting = time.perf_counter()
        self.seconds["decode"] += fitting - started
        _fit(name, image, out)
        self.seconds["fit"] += time.perf_counter() - fitting


def _fit(name: str, image: np.ndarray, out: np.ndarray) -> None:
    """Resize an HWC image into `out` (bilinear with antialiasing; the mask by nearest
    neighbour, so a thresholded mask stays 0/1). Each branch gives F.interpolate's bytes
    (tests/test_decode_scaled.py checks), at less cost than calling it: the resize costs about
    as much as the decode."""
    size = out.shape[:2]
    if name == schema.MASK:  # torch's nearest on a one-channel uint8 image costs 5x these two takes
        np.take(np.take(image, _nearest(image.shape[0], size[0]), axis=0), _nearest(image.shape[1], size[1]),
                axis=1, out=out)
        return
    chw = torch.from_numpy(image).permute(2, 0, 1)[None]
    if image.shape[2] == 3:
        # F.interpolate returns an RGB image as NCHW, then transposed back; written into the
        # channels-last (HWC) output by the same kernel, it costs half. Its one-channel kernel
        # costs more than this one for three (0.064 vs 0.047 ms from 112 to 64 px), so a grey
        # image comes as RGB and keeps one channel: F.interpolate's bytes for the grey, too.
        rgb = out if out.shape[2] == 3 else np.empty((*size, 3), np.uint8)
        torch._C._nn._upsample_bilinear2d_aa(chw, size, False, out=torch.from_numpy(rgb).permute(2, 0, 1)[None])
        if rgb is not out:
            np.copyto(out[..., 0], rgb[..., 0])
        return
    resized = nn_functional.interpolate(chw, size=size, mode="bilinear", antialias=True, align_corners=False)
    np.copyto(out, resized[0].permute(1, 2, 0).numpy())  # numpy: no intra-op thread pool for a small copy


@functools.lru_cache(maxsize=64)
def _nearest(source: int, size: int) -> np.ndarray:
    """The source row of each of `size` output rows in F.interpolate's "nearest-exact" (its
    own arithmetic: a ramp of row numbers resized with it)."""
    ramp = torch.arange(source, dtype=torch.float32)[None, None, :, None]
    return nn_functional.interpolate(ramp, size=(size, 1), mode="nearest-exact")[0, 0, :, 0].numpy().astype(np.intp)


def decode(members: dict[str, bytes], size: int, decoder: Decoder | None = None) -> dict[str, torch.Tensor]:
    """One sample as CHW uint8 tensors of size x size (see Decoder.decode_into; a decoder made
    here decodes scaled), in memory of its own: for code that handles samples one by one
    (predict-style use, bench/loader.py's stock-webdataset baseline)."""
    decoder = decoder or Decoder(size)
    out = {name: np.empty((size, size, CHANNELS[name]), np.uint8) for name in schema.IMAGE_MEMBERS}
    decoder.decode_into(members, out)
    return {name: torch.from_numpy(image).permute(2, 0, 1) for name, image in out.items()}
