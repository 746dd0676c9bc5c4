"""Images load as displayed and in correct colours whatever their mode; check_data reports lossy ones."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from llava.data.images import ImageError, inspect_image, load_image
from llava.tools.check_data import main as check_data
from tests.test_check_data import qa, tokenizer_dir  # noqa: F401 - the fixture is used by name


def saved(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


def pixel(path) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(load_image(path))[0, 0])


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 50 % of 65535 (128 * 257)
    path = saved(grey, tmp_path / "grey16.png")
    assert Image.open(path).mode.startswith("I")  # Pillow reads it back as a 16/32-bit integer image
    assert pixel(path) == (128, 128, 128)  # Pillow's own convert("RGB") gives (255, 255, 255)
    assert inspect_image(path)[1] == "16-bit pixels reduced to 8 bits"


def test_32_bit_integer_and_float_images(tmp_path):
    wide = Image.fromarray(np.array([[70000, 0], [-5, 65535]], dtype=np.int32), mode="I")
    path = saved(wide, tmp_path / "wide.tif")
    image, lossy = inspect_image(path)
    assert np.asarray(image)[:, :, 0].tolist() == [[255, 0], [0, 255]] and "clipped" in lossy
    unit_float = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), mode="F")
    path = saved(unit_float, tmp_path / "half.tif")
    assert pixel(path) == (128, 128, 128) and inspect_image(path)[1] == "float pixels reduced to 8 bits"


def test_transparency_is_composited_on_white_and_reported(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    path = saved(rgba, tmp_path / "clear.png")
    assert pixel(path) == (255, 255, 255) and "transparency" in inspect_image(path)[1]
    half = saved(Image.new("LA", (4, 4), (0, 128)), tmp_path / "half.png")
    assert pixel(half) == (127, 127, 127)  # black at 50 % alpha over white
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    path = saved(palette, tmp_path / "palette.png", transparency=1)
    assert pixel(path) == (255, 255, 255)
    opaque = saved(Image.new("RGBA", (4, 4), (0, 0, 255, 255)), tmp_path / "opaque.png")
    assert pixel(opaque) == (0, 0, 255) and inspect_image(opaque)[1] is None  # nothing lost


def test_cmyk_and_exif_orientation(tmp_path):
    cmyk = saved(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), tmp_path / "red.jpg", quality=100)
    red = pixel(cmyk)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 20, 20))  # white left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buffer.getvalue())
    displayed = np.asarray(load_image(path))
    assert displayed.shape[:2] == (40, 20)  # portrait, as a viewer shows it
    assert displayed[2, 10].mean() > 200 and displayed[-3, 10].mean() < 50  # white half now on top


def test_unreadable_image_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match=r"broken\.png"):
        load_image(path)


def test_check_data_reports_lossy_images_by_sample(tmp_path, tokenizer_dir):  # noqa: F811
    folder = tmp_path / "images"
    folder.mkdir()
    saved(Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)), folder / "deep.png")
    saved(Image.new("RGB", (8, 8), (1, 2, 3)), folder / "plain.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "deep-1", "image": "deep.png", "conversations": qa()},
                                {"id": "plain-1", "image": "plain.png", "conversations": qa()}]))  # fmt: skip
    report_path = tmp_path / "report.json"
    code = check_data(["--data_path", str(data), "--image_folder", str(folder), "--tokenizer", str(tokenizer_dir),
                       "--tokens_per_image", "4", "--json-report", str(report_path)])  # fmt: skip
    report = json.loads(report_path.read_text())
    assert code == 0 and report["num_lossy_images"] == 1  # reported, not a failure
    [example] = report["lossy_examples"]
    assert "deep-1" in example and "deep.png" in example and "16-bit" in example
