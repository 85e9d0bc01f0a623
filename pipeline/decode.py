"""Raw sample members to uint8 tensors at the training size, and the cheap checks that catch
broken JPEGs.

libjpeg only warns on a truncated file and fills the rest with grey, so a JPEG must start
with SOI and end with EOI (trailing zero padding allowed) before it is decoded at all.
Members of another size (a half-size depth map, or all of them when training at a smaller
size) are then fitted to the training size.
"""

import functools
import warnings

import torch
from torch.nn import functional as nn_functional
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline import schema

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
MODES = {schema.BG: ImageReadMode.RGB, schema.BGFG: ImageReadMode.RGB,
          schema.MASK: ImageReadMode.GRAY, schema.DEPTH: ImageReadMode.GRAY}
MASK_THRESHOLD = 127  # the JPEG mask is only roughly 0/255


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


def decode(members: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """Checked members to CHW uint8 tensors: bg, bgfg RGB; mask 0/1; depth luminance.

    Raises BadSample when a JPEG does not decode. The bg tensor may be shared with other
    samples (see _decode_background): read it, never write to it.
    """
    check(members)
    with warnings.catch_warnings():
        # torchvision 0.29 flags its codecs as deprecated on every call; they are still the
        # decoder this project pins, and the warning would flood every worker's log.
        warnings.simplefilter("ignore", DeprecationWarning)
        images = {name: _decode_background(members[name]) if name == schema.BG else _decode(name, members[name])
                  for name in MODES}
    images[schema.MASK] = (images[schema.MASK] > MASK_THRESHOLD).to(torch.uint8)
    return images


def _decode(name: str, data: bytes) -> torch.Tensor:
    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=MODES[name])
    except RuntimeError as error:
        raise BadSample(f"{name} does not decode: {str(error).splitlines()[0]}") from None


@functools.lru_cache(maxsize=128)
def _decode_background(data: bytes) -> torch.Tensor:
    """Backgrounds repeat: the seed dataset composes 2,000 samples on each of its 100, so a
    worker keeps the last 128 it decoded (about 19 MB at 224 px), keyed by their bytes."""
    return _decode(schema.BG, data)


def fit(images: dict[str, torch.Tensor], size: int, out: dict[str, torch.Tensor]) -> None:
    """Bring each decoded member to `size` x `size` (bilinear with antialiasing; the mask by
    nearest neighbour, so it stays 0/1) and write it into `out` (the sample's batch slots)."""
    for name, image in images.items():
        if image.shape[-2:] != (size, size):
            if name == schema.MASK:
                image = nn_functional.interpolate(image[None], size=(size, size), mode="nearest-exact")[0]
            else:
                image = nn_functional.interpolate(image[None], size=(size, size), mode="bilinear",
                                                  antialias=True, align_corners=False)[0]
        out[name].copy_(image)
