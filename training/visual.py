"""Pictures for people: a depth colour map and the validation preview grid."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

# Polynomial fit of Google's Turbo colour map (Mikhailov 2019): one row per channel, the
# coefficients of x^0..x^5.
_TURBO = np.array(
    [
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ]
)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """Depth in 0..1 ([H,W], larger = farther) -> uint8 RGB [H,W,3]; near is red, far is blue."""
    x = 1.0 - np.clip(depth.astype(np.float64), 0.0, 1.0)
    powers = np.stack([x**i for i in range(6)], axis=-1)
    rgb = np.clip(powers @ _TURBO.T, 0.0, 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


def _depth_tile(depth: torch.Tensor) -> torch.Tensor:
    rgb = colorize_depth(depth.squeeze(0).float().cpu().numpy())
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _gray_tile(values: torch.Tensor) -> torch.Tensor:
    """[1,H,W] floats in 0..1 -> uint8 [3,H,W]."""
    return (values.float().clamp(0, 1).cpu() * 255).round().to(torch.uint8).expand(3, -1, -1)


COLUMNS = ("bg", "bgfg", "true mask", "predicted mask", "true depth", "predicted depth")
TILE_MIN = 128  # small training images are enlarged (nearest: pixels stay honest) up to this
PADDING, HEADER = 2, 20


def save_preview(path: Path, bg, bgfg, mask_true, mask_logits, depth_true, depth_pred) -> None:
    """One row per sample under a header naming the COLUMNS: bg | bgfg | true mask | predicted
    mask | true depth | predicted depth (depth colour-mapped: near red, far blue).

    bg, bgfg uint8 [N,3,H,W]; masks and depths float [N,1,H,W] (mask 0/1 and logits, depth 0..1).
    """
    tiles = []
    for i in range(bgfg.shape[0]):
        tiles += [bg[i].cpu(), bgfg[i].cpu(), _gray_tile(mask_true[i]),
                  _gray_tile(torch.sigmoid(mask_logits[i].float())), _depth_tile(depth_true[i]),
                  _depth_tile(depth_pred[i])]
    scale = max(1, -(-TILE_MIN // bgfg.shape[-1]))
    tiles = torch.stack(tiles).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    grid = make_grid(tiles, nrow=len(COLUMNS), padding=PADDING, pad_value=255)
    body = Image.fromarray(grid.permute(1, 2, 0).numpy())
    image = Image.new("RGB", (body.width, body.height + HEADER), "white")
    image.paste(body, (0, HEADER))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=13)
    step = tiles.shape[-1] + PADDING
    for column, label in enumerate(COLUMNS):
        centre = PADDING + column * step + tiles.shape[-1] / 2
        draw.text((centre, HEADER / 2 + 1), label, fill="black", font=font, anchor="mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
