import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_bach.imageio import ImageReadError, bach_class_from_path, read_image, to_rgb_uint8


def test_rgb_tiff_with_resolution_tags(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, rgb, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    data = read_image(path)
    np.testing.assert_array_equal(data.rgb, rgb)
    assert data.mpp == pytest.approx(0.5)
    assert data.notices == [] and data.tissue_class is None


def test_screen_dpi_is_not_taken_as_pixel_size(tmp_path):
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), resolution=(72, 72), resolutionunit="INCH")
    assert read_image(path).mpp is None


@pytest.mark.parametrize("name, folder, cls", [
    ("n001.tif", "", "Normal"), ("b012.tif", "", "Benign"), ("is003.tif", "", "InSitu"),
    ("iv100.tif", "", "Invasive"), ("slide7.tif", "Invasive", "Invasive"), ("slide7.tif", "other", None),
])
def test_bach_class_and_default_pixel_size(tmp_path, name, folder, cls):
    (tmp_path / folder).mkdir(exist_ok=True)
    path = tmp_path / folder / name
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8))
    data = read_image(path)
    assert bach_class_from_path(path) == cls == data.tissue_class
    assert data.mpp == (0.42 if cls else None)


def test_grayscale_rgba_and_16bit_are_converted_with_notices(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((6, 6), 100, np.uint8)).save(gray)
    d = read_image(gray)
    assert d.rgb.shape == (6, 6, 3) and (d.rgb == 100).all() and "grayscale" in d.notices[0]

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent -> white
    rgba[0, 0, 3] = 255
    out = to_rgb_uint8(rgba, notes := [])
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)
    assert any("alpha" in n for n in notes)

    deep = tmp_path / "d.tif"
    tifffile.imwrite(deep, np.full((4, 4, 3), 65535, np.uint16))
    d = read_image(deep)
    assert d.rgb.dtype == np.uint8 and (d.rgb == 255).all() and "uint16" in d.notices[0]


def test_corrupt_truncated_and_unsupported_files_raise_clear_errors(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    garbage = tmp_path / "junk.tif"
    garbage.write_bytes(b"this is not a tiff")
    for path in (truncated, garbage):
        with pytest.raises(ImageReadError, match=path.name):
            read_image(path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_pixel_size_has_one_resolver_and_unknown_stays_unknown(tmp_path):
    from napari_bach.pixelsize import resolve_mpp

    bach = tmp_path / "iv001.tif"
    assert resolve_mpp(path=bach).describe() == "0.42 µm/px (BACH file name)"
    assert resolve_mpp(explicit=0.25, tags=0.5, path=bach).mpp == 0.25  # what the user typed wins
    assert resolve_mpp(tags=0.5, path=bach, fallback=0.3).source == "file tags"
    assert resolve_mpp(path=tmp_path / "x.png", fallback=0.3).mpp == 0.3
    unknown = resolve_mpp(path=tmp_path / "x.png")
    assert unknown.mpp is None and not unknown.known and unknown.describe() == "µm/px unknown"
    with pytest.raises(ValueError, match="between"):
        resolve_mpp(explicit=-1)


def test_cmyk_jpeg_is_converted_not_read_as_alpha(tmp_path):
    """K used to become alpha: the image opened white and gave 0 nuclei."""
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 180, 60, 140  # an H&E-ish purple
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=100)
    data = read_image(path)
    assert data.rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(data.rgb.reshape(-1, 3).mean(0), (180, 60, 140), atol=8)
    assert any("CMYK" in n for n in data.notices) and not any("alpha" in n for n in data.notices)


def test_12_bit_data_in_16_bit_file_uses_its_bit_depth(tmp_path):
    """Scaled by 65535 it was near black (and still 'found' hundreds of nuclei)."""
    path = tmp_path / "cam.tif"
    data12 = np.zeros((8, 8, 3), np.uint16)
    data12[0, 0] = 4095
    data12[1, 1] = 2048
    tifffile.imwrite(path, data12)
    d = read_image(path)
    assert tuple(d.rgb[0, 0]) == (255, 255, 255) and d.rgb[1, 1, 0] == 128
    assert "12-bit" in d.notices[0] and "4095" in d.notices[0]


def test_multi_page_tiff_says_which_page_is_read(tmp_path):
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.full((16, 16, 3), 10, np.uint8))
        tif.write(np.full((8, 8, 3), 200, np.uint8))
    d = read_image(path)
    assert (d.rgb == 10).all() and any("page 1 of 2" in n for n in d.notices)


def test_opaque_rgba_needs_no_compositing(tmp_path):
    path = tmp_path / "opaque.png"
    Image.fromarray(np.full((4, 4, 4), 255, np.uint8)).save(path)
    assert read_image(path).notices == []


def test_glass_rule_adapts_to_a_scanner_whose_glass_is_grey():
    """Issue 28.4: BACH slide crops' glass is about (217, 213, 212), under the fixed 220, so a
    crop that is ~30% glass was counted ~99% tissue."""
    from napari_bach.imageio import glass_level, is_tissue
    from napari_bach.synthetic import synthetic_he

    rng = np.random.default_rng(0)
    tissue, _ = synthetic_he((200, 300), seed=2)
    tissue = np.where(tissue.min(-1, keepdims=True) > 185, np.array([225, 160, 200], np.uint8), tissue)  # all stained
    glass = np.clip(np.array([217, 213, 212]) + rng.normal(0, 2, (200, 130, 3)), 0, 255).astype(np.uint8)
    crop = np.concatenate([tissue, glass], axis=1)  # 130 / 430 = 30% glass
    assert 190 < glass_level(crop) < 205
    assert is_tissue(crop).mean() == pytest.approx(300 / 430, abs=0.03)
    white = np.concatenate([tissue, np.full((200, 130, 3), 245, np.uint8)], axis=1)
    assert glass_level(white) == 220 and is_tissue(white).mean() == pytest.approx(300 / 430, abs=0.03)
    assert glass_level(tissue) == 220  # no glass: the fixed level, nothing of the tissue lost
