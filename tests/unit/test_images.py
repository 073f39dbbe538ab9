import pytest
import torch

from hero_ml.images import image_grid


def test_tiles_sit_row_major_on_a_white_canvas_with_their_padding() -> None:
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30], [200, 100, 50]])
    images = colours[:, None, None, :].expand(5, 24, 20, 3).to(torch.uint8).contiguous()
    grid = image_grid(images, pad=2)  # 5 images: ceil(sqrt(5)) = 3 columns, 2 rows
    assert grid.size == (3 * (20 + 2) + 2, 2 * (24 + 2) + 2)
    for index, colour in enumerate(colours.tolist()):
        row, column = divmod(index, 3)
        x, y = 2 + column * 22, 2 + row * 26
        assert grid.getpixel((x + 19, y + 23)) == tuple(colour)  # the corner away from the index label
        assert grid.getpixel((x - 1, y - 1)) == (255, 255, 255)  # the padding before it
    assert grid.getpixel((2 + 2 * 22 + 10, 2 + 26 + 12)) == (255, 255, 255)  # the empty sixth tile
    assert image_grid(images, columns=5, pad=0).size == (100, 24)


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(2, 8, 8, 3),
        torch.zeros(8, 8, 3, dtype=torch.uint8),
        torch.zeros(2, 8, 8, 4, dtype=torch.uint8),
    ],
)
def test_anything_but_uint8_rgb_batches_is_refused(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(B, H, W, 3\), got"):
        image_grid(images)
