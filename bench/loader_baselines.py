"""The baselines bench/loader.py measures make_loader against, each doing the same decode work:

- decode_only: each sample's four JPEGs decoded from memory by the pipeline's decoder
  (simplejpeg, strict) in `workers` processes, nothing else: the ceiling for any loader
  doing this decode. Also with strict=False (what detecting corrupt JPEGs costs), with
  torchvision.io.decode_jpeg (the decoder the pipeline used before), and at the libjpeg
  reduction the pipeline's scaled decode uses for a training size (pipeline.decode.scaled_shape).
- stock webdataset: webdataset.WebDataset over the same shards, a shuffle buffer, the
  pipeline's own per-sample decode + fit (pipeline.decode.decode, background cache included)
  and augmentation draw, batches of `batch_size` collated by webdataset, a torch DataLoader
  with `workers` workers; run in bench/loader.py's child process like make_loader.
- seed_zip_pil: the original approach, a map-style Dataset reading the zip directly with PIL
  and transforms.ToTensor, in a DataLoader with 1 worker (more broke the seed).
"""

import io
import multiprocessing
import os
import resource
import time
import warnings
import zipfile

import simplejpeg
import torch
from torchvision.io import ImageReadMode, decode_jpeg as torchvision_decode_jpeg

from pipeline import schema
from pipeline.augment import draw, sample_rng
from pipeline.decode import COLORSPACES, Decoder, decode, scaled_shape
from pipeline.shardreader import read_samples

_SAMPLES = []  # decode_only's encoded samples, filled before its processes fork


def cpu_seconds(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# --- decode only -------------------------------------------------------------------------
def _decode_range(job) -> int:
    (start, stop), how, size = job
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 flags its codecs on every call
    for members in _SAMPLES[start:stop]:
        for name, space in COLORSPACES.items():
            if how == "torchvision":
                torchvision_decode_jpeg(torch.frombuffer(bytearray(members[name]), dtype=torch.uint8),
                                        mode=ImageReadMode.RGB if space == "RGB" else ImageReadMode.GRAY)
            elif size is None:
                simplejpeg.decode_jpeg(members[name], space, strict=how == "strict")
            else:
                height, width, _, _ = simplejpeg.decode_jpeg_header(members[name])
                if name != schema.MASK:  # as the pipeline: the mask whole (pipeline/decode.py)
                    height, width = scaled_shape(height, width, (size, size))
                simplejpeg.decode_jpeg(members[name], space, min_height=height, min_width=width, strict=how == "strict")
    return stop - start


def decode_only(urls: list[str], workers: int, how: str = "strict", size: int | None = None) -> tuple[float, float]:
    """(samples/s, CPU seconds per sample) of decoding the shards' JPEGs in `workers` processes;
    `how`: "strict" (the pipeline's decode), "lenient" (strict=False) or "torchvision"; with
    `size` (simplejpeg only), each JPEG at the reduction scaled decode uses for that training size."""
    _SAMPLES.extend(s.members for url in urls for s in read_samples(url, 0, None) if s.error is None)
    step = -(-len(_SAMPLES) // workers)
    cpu_before = cpu_seconds(resource.RUSAGE_CHILDREN)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_range, [((0, 1), how, size)] * workers)  # processes up before the clock starts
        started = time.perf_counter()
        done = sum(pool.map(_decode_range, [((i, i + step), how, size) for i in range(0, len(_SAMPLES), step)]))
        elapsed = time.perf_counter() - started
    _SAMPLES.clear()
    return done / elapsed, (cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before) / done


# --- stock webdataset ----------------------------------------------------------------------
class _SampleDecoder:
    """The pipeline's per-sample work as a webdataset map: decode + fit, then the draw."""

    def __init__(self, image_size: int, seed: int = 0, epoch: int = 0):
        self.image_size, self.seed, self.epoch = image_size, seed, epoch
        self.decoder = None  # one per worker process, with its background cache

    def __call__(self, sample: dict) -> dict:
        if self.decoder is None:
            self.decoder = Decoder(self.image_size)
        images = decode({name: sample[name] for name in schema.IMAGE_MEMBERS}, self.image_size, self.decoder)
        augmentation = torch.tensor(draw(sample_rng(self.seed, self.epoch, sample["__key__"])))
        return {"bg": images[schema.BG], "bgfg": images[schema.BGFG], "mask": images[schema.MASK],
                "depth": images[schema.DEPTH], "aug": augmentation, "key": sample["__key__"]}


def webdataset_batches(urls: list[str], workers: int, batch_size: int, image_size: int, shuffle: int = 512):
    """A DataLoader over stock webdataset doing the pipeline's work (one epoch per iteration)."""
    import webdataset

    dataset = (webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)
               .shuffle(shuffle).map(_SampleDecoder(image_size)).batched(batch_size, partial=False))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)


# --- the seed's approach ---------------------------------------------------------------------
class SeedZipDataset(torch.utils.data.Dataset):
    """As the original code did: one ZipFile, folders paired by list position, PIL + ToTensor."""

    def __init__(self, dataset: str, image_size: int):
        from torchvision import transforms

        self.zip = zipfile.ZipFile(os.path.join(dataset, schema.ZIP_DIR, schema.zip_name(1)))
        names = self.zip.namelist()
        self.lists = [sorted(n for n in names if n.startswith(folder + "/") and not n.endswith("/"))
                      for folder in (schema.COMPOSITE_DIR, schema.MASK_DIR, schema.DEPTH_DIR)]
        self.bg_dir = os.path.join(dataset, schema.BG_DIR)
        self.to_tensor = transforms.ToTensor()
        self.resize = transforms.Resize((image_size, image_size))

    def __len__(self):
        return min(map(len, self.lists))

    def __getitem__(self, i):
        from PIL import Image

        bgfg, mask, depth = (Image.open(io.BytesIO(self.zip.read(names[i]))) for names in self.lists)
        bg = Image.open(os.path.join(self.bg_dir, schema.bg_name(schema.background_id(schema.key_of(self.lists[0][i])))))
        return (self.to_tensor(bg.convert("RGB")), self.to_tensor(bgfg.convert("RGB")),
                self.to_tensor(mask.convert("L")), self.to_tensor(self.resize(depth.convert("L"))))


def seed_zip_pil(dataset: str, samples: int, batch_size: int, image_size: int) -> float:
    data = SeedZipDataset(dataset, image_size)
    subset = torch.utils.data.Subset(data, range(min(samples, len(data))))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=True, num_workers=1)
    started = time.perf_counter()
    count = sum(len(batch[0]) for batch in loader)
    return count / (time.perf_counter() - started)
