"""Depth labels for composites from a transformers depth-estimation model.

The one module of the write side that imports torch, and only when a DepthLabeller is made, so
the synthetic generator and the converter run without it. The model is loaded with
AutoModelForDepthEstimation and AutoImageProcessor from a hub id or a save_pretrained folder,
and runs batched: on CUDA in bf16 (fp16 where the GPU lacks bf16), on the CPU in fp32.

Its output becomes the project's depth convention, 0..255 with larger = farther, per image:
models that predict relative inverse depth (Depth Anything's relative models, DPT/MiDaS) give
    far = 255 * (d_max - d) / (d_max - d_min)
and models that predict depth (metric Depth Anything, ZoeDepth, GLPN, Depth Pro)
    far = 255 * (d - d_min) / (d_max - d_min)
rounded, with d_min and d_max the image's own extremes after the processor's resize to 224x224
(an image of one value is all 0). Relative inverse depth is known only up to a scale and shift,
so its reciprocal means nothing; a linear map of it keeps its order, nearest 0 and farthest 255.
"""

import hashlib
import os

import numpy as np

from seedzips.errors import ConvertError

DEFAULT_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
DEVICES = ("auto", "cpu", "cuda")
_INVERSE_DEPTH_TYPES = {"depth_anything", "dpt"}  # those of relative inverse depth (unless metric)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def predicts_inverse_depth(config) -> bool:
    """Whether a model of this config predicts relative inverse depth (larger = nearer)."""
    metric = getattr(config, "depth_estimation_type", "relative") == "metric"
    return config.model_type in _INVERSE_DEPTH_TYPES and not metric


def to_far(depth: np.ndarray, inverse: bool) -> np.ndarray:
    """A model's H x W float output as uint8, 0 nearest .. 255 farthest (see the module doc)."""
    depth = depth.astype(np.float64)
    low, high = float(depth.min()), float(depth.max())
    if not high > low:
        return np.zeros(depth.shape, np.uint8)
    far = (high - depth) if inverse else (depth - low)
    return np.rint(far * (255 / (high - low))).clip(0, 255).astype(np.uint8)


class DepthLabeller:
    """`labeller(images)`: a list of H x W x 3 uint8 composites -> their H x W uint8 depth maps."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "auto", index: int | None = None):
        """`index`: which CUDA device (a torchrun rank's local rank), else the current one."""
        if device not in DEVICES:
            raise ConvertError(f"--device {device}: must be one of {', '.join(DEVICES)}")
        try:
            import huggingface_hub
            import torch
            import transformers
        except ImportError as error:
            raise ConvertError(f"depth labels need torch and transformers ({error}); "
                               "pip install -r requirements.txt") from None
        # A failure is told in one line below, not by the libraries' warnings and retry notices.
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        huggingface_hub.utils.logging.set_verbosity_error()
        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConvertError("--device cuda: no CUDA device is available")
        if device == "cuda" and index is not None and index >= torch.cuda.device_count():
            raise ConvertError(f"--device cuda: local rank {index}, but {torch.cuda.device_count()} CUDA devices")
        self.device = torch.device(device, index) if device == "cuda" and index is not None else torch.device(device)
        if device == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32
        try:
            self.model = transformers.AutoModelForDepthEstimation.from_pretrained(model, dtype=self.dtype)
            self.processor = transformers.AutoImageProcessor.from_pretrained(model)
        except Exception as error:  # transformers raises OSError, ValueError, KeyError... with the reason
            raise ConvertError(f"cannot load depth model {model}: {_first_line(error)}") from None
        self.model.to(self.device).eval()
        self.inverse = predicts_inverse_depth(self.model.config)
        # What makes the labels what they are, for the dataset's record (a resume must match it).
        self.identity = {"model": model, "revision": self._revision(model), "model_type": self.model.config.model_type,
                         "dtype": str(self.dtype).removeprefix("torch."), "inverse_depth": self.inverse}

    def _revision(self, model: str) -> str | None:
        """The hub commit of a hub model; for a local folder, a digest of its files."""
        if not os.path.isdir(model):
            return getattr(self.model.config, "_commit_hash", None)
        digest = hashlib.sha256()
        for name in sorted(os.listdir(model)):
            path = os.path.join(model, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest.update(name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
        return digest.hexdigest()

    def __call__(self, images: list) -> list:
        torch = self._torch
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            outputs = self.model(pixel_values=pixels)
        outputs.predicted_depth = outputs.predicted_depth.float()
        sizes = [image.shape[:2] for image in images]
        depths = self.processor.post_process_depth_estimation(outputs, target_sizes=sizes)
        return [to_far(d["predicted_depth"].cpu().numpy(), self.inverse) for d in depths]
