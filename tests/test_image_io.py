import io

import numpy as np
import pytest
from PIL import Image

from mvpseg import ImageError, load_image
from mvpseg.image_io import resize_short_side


def _png(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_modes_become_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(_png(gray))
    assert out.shape == (3, 4, 3) and (out[:, :, 0] == gray).all() and (out[:, :, 2] == gray).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red, transparent pixels become white
    out = load_image(_png(rgba))
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    assert load_image(np.ones((5, 6), np.float32) * 0.5)[0, 0].tolist() == [128, 128, 128]


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"this is not an image")
    data = _png(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ImageError, match="corrupt|not a readable"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ImageError, match="limit is"):
        load_image(_png(np.zeros((100, 100, 3), np.uint8)), max_pixels=5000)  # refused from the header
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(np.zeros((2, 100, 3), np.uint8))
    with pytest.raises(ImageError):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError):
        load_image(12345)


def test_resize_short_side():
    assert resize_short_side(1000, 500, 512, 2048) == (1024, 512)
    assert resize_short_side(5000, 1000, 512, 2048) == (2048, 410)


def test_16_bit_gray_has_one_fixed_scale_for_files_and_arrays(tmp_path):
    from PIL import Image as PILImage

    from mvpseg.image_io import load_image as load

    a = np.array([[0, 257, 1000], [25700, 65535, 514]], dtype=np.uint16)  # a dark 16-bit image, one white pixel
    path = tmp_path / "gray16.png"
    PILImage.fromarray(a).save(path)
    assert PILImage.open(path).mode.startswith("I")
    from_file, from_array = load(path), load(a)
    np.testing.assert_array_equal(from_file, from_array)
    np.testing.assert_array_equal(from_file[..., 0], np.round(a / 257.0).astype(np.uint8))  # not a / a.max()
    dark = np.full((4, 4), 1000, np.uint16)  # no bright pixel: stays dark instead of being stretched to white
    PILImage.fromarray(dark).save(tmp_path / "dark.png")
    assert load(tmp_path / "dark.png").max() == 4 == load(dark).max()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_files_give_their_first_frame_and_say_so(fmt):
    """GIF frames after the first were dropped silently: the first frame is used and the result says so."""
    import io

    from PIL import Image

    from mvpseg.image_io import read_image

    frames = [Image.fromarray(np.full((24, 32, 3), c, np.uint8)) for c in (40, 200, 120)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = read_image(buf.getvalue())
    assert loaded.animated and "only its first frame" in loaded.note
    assert abs(int(loaded.rgb.mean()) - 40) <= 2  # frame 0, not the frame Pillow looked at last
    still = io.BytesIO()
    frames[1].save(still, fmt)
    single = read_image(still.getvalue())
    assert not single.animated and single.note is None and abs(int(single.rgb.mean()) - 200) <= 2
