"""training.visual: the preview grid is one labelled column per image kind."""

import numpy as np
import torch
from PIL import Image

from training import visual


def test_preview_has_a_labelled_column_per_kind_and_enlarges_small_images(tmp_path):
    n, size = 3, 32
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    maps = torch.zeros(n, 1, size, size)
    maps[..., : size // 2] = 1.0
    visual.save_preview(tmp_path / "p.png", images, images + 255, maps, maps * 20 - 10, maps, 1 - maps)
    grid = np.asarray(Image.open(tmp_path / "p.png"))
    tile = visual.TILE_MIN  # 32 px is enlarged 4x
    columns = len(visual.COLUMNS)
    assert grid.shape == (visual.HEADER + n * (tile + visual.PADDING) + visual.PADDING,
                          columns * (tile + visual.PADDING) + visual.PADDING, 3)
    header = grid[: visual.HEADER]
    for column in range(columns):  # some dark label pixels over every column
        left = visual.PADDING + column * (tile + visual.PADDING)
        assert (header[:, left:left + tile] < 128).any(), visual.COLUMNS[column]
    row = grid[visual.HEADER + visual.PADDING + tile // 2]
    left_of = [visual.PADDING + c * (tile + visual.PADDING) for c in range(columns)]
    assert row[left_of[0] + 4].max() == 0 and row[left_of[1] + 4].min() == 255  # bg black, bgfg white
    assert (row[left_of[2] + 4] == 255).all() and (row[left_of[2] + tile - 4] == 0).all()  # true mask halves
    far, near = row[left_of[4] + 4], row[left_of[4] + tile - 4]  # true depth: 1 (far) on the left
    assert near[0] > 100 > near[2] and np.abs(far.astype(int) - near).max() > 50  # near is red
    assert (row[left_of[5] + 4] == near).all() and (row[left_of[5] + tile - 4] == far).all()  # predicted: mirrored
