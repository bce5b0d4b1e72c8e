"""Images of unknown µm/px are segmented at the scale their nuclei's size says."""
import numpy as np
import pytest
import torch

from conftest import OracleModel, image_with_squares, tiny_config
from napari_bach.config import Thresholds
from napari_bach.predict import predict
from napari_bach.scale import MIN_NUCLEI, median_diameter, tissue_window

SIDE = 21  # squares of 21 px: the oracle's boxes (and masks) are 20×20, an equivalent diameter of 22.6 px
SQUARES = [(y, x, SIDE) for y in range(30, 560, 60) for x in range(40, 560, 60)]


def _image():
    return image_with_squares((600, 600), SQUARES)


def test_median_diameter_and_the_most_tissue_rich_window():
    labels = np.zeros((50, 50), np.int32)
    labels[:10, :10], labels[20:24, 20:24], labels[30:50, 30:50] = 1, 2, 3
    d, n = median_diameter(labels)
    assert n == 3 and d == pytest.approx(np.sqrt(4 * 100 / np.pi))
    rgb = np.full((2000, 3000, 3), 255, np.uint8)
    rgb[1200:1900, 2100:2900] = 90
    ys, xs = tissue_window(rgb, 768)
    assert ys.start >= 1000 and xs.start >= 1900 and ys.stop - ys.start == 768 == xs.stop - xs.start
    assert tissue_window(rgb[:500, :600], 768) == (slice(0, 500), slice(0, 600))


def test_unknown_mpp_is_estimated_from_the_nuclei_and_used_for_segmenting_only():
    # nuclei of 9 µm: 22.6 px of them means 0.40 µm/px; the model works at 0.6 µm/px
    model = OracleModel(tiny_config(mpp=0.6, nucleus_diameter_um=9.0))
    det = predict(_image(), model, None)
    # measured again at the scale it gave (scale.PASSES): boxes ±1 px there
    assert det.scale_estimate == pytest.approx(9.0 / np.sqrt(4 * 400 / np.pi), rel=0.03)
    assert not det.pixel_size.known  # an estimate is not the image's µm/px: sizes stay in pixels
    assert model.seen.shape[-1] <= 128 and det.image_shape == (600, 600)
    seg = det.refilter(0.5, 0.5)
    assert len(seg.ids) == len(SQUARES)
    for y, x, s in SQUARES:  # found where they are, at the image's own pixels
        inside = seg.labels[y:y + s, x:x + s]
        assert (inside > 0).mean() > 0.6, (y, x)
    # a minimum area in µm² converts at the scale it was segmented at, not the model's
    assert det.segmented_mpp == det.scale_estimate
    area_um2 = 400 * det.scale_estimate**2  # a 20×20 px nucleus at the estimate: 64 µm²
    for factor, kept in ((0.5, len(SQUARES)), (2.0, 0)):
        limit = Thresholds(min_area=factor * area_um2).min_area_px(det.segmented_mpp, model.config)
        assert len(det.refilter(0.5, 0.5, min_area=limit).ids) == kept


def test_no_estimate_without_a_reference_size_few_nuclei_or_a_known_mpp():
    assert predict(_image(), OracleModel(tiny_config(mpp=0.6)), None).scale_estimate is None
    few = image_with_squares((600, 600), SQUARES[: MIN_NUCLEI - 1])
    model = OracleModel(tiny_config(mpp=0.6, nucleus_diameter_um=9.0))
    assert predict(few, model, None).scale_estimate is None
    assert predict(_image(), model, 0.4).scale_estimate is None  # the file's own µm/px wins


@pytest.mark.parametrize("mpp, working", [
    (0.3, 9.0 / np.sqrt(4 * 400 / np.pi)),  # 6.8 µm nuclei: zoomed until they look 9 µm (0.40 µm/px)
    (0.15, 0.3),  # 3.4 µm: less than half the reference, zoomed 2× only (scale.ZOOM_LIMITS)
    (0.45, 0.45),  # 10 µm: larger than the model's, so not like the lab's: its own scale
])
def test_a_lab_model_zooms_each_image_with_small_nuclei_as_the_labs_until_they_look_the_reference(mpp, working):
    from napari_bach.pixelsize import PixelSize
    from napari_bach.scale import scale_note

    # a lab of small nuclei: they look like the model's 9 µm at 0.2 µm/px where it works at 0.3
    model = OracleModel(tiny_config(mpp=0.3, nucleus_diameter_um=9.0, lab_mpp=0.2))
    det = predict(_image(), model, mpp)
    assert det.scale_estimate == pytest.approx(working, rel=0.03)  # measured again at its zoom: boxes ±1 px
    assert det.pixel_size.mpp == mpp == det.segmented_mpp  # sizes and minimum areas stay in the image's µm
    assert len(det.refilter(0.5, 0.5).ids) == len(SQUARES)
    note = scale_note(det.pixel_size, det.scale_estimate, 0.3)
    assert ("its nuclei are smaller" in note) == (working > mpp) and (note == "") == (working == mpp)
    few = image_with_squares((600, 600), SQUARES[: MIN_NUCLEI - 1])
    assert predict(few, model, mpp).scale_estimate is None  # nothing to judge by: its own scale
    with pytest.raises(ValueError, match="needs nucleus_diameter_um"):
        tiny_config(mpp=0.3, lab_mpp=0.2)
    assert scale_note(PixelSize(None), None, 0.3).startswith("µm/px unknown")


class MissesSmallNuclei(OracleModel):
    """A detector that, as a real one, misses nuclei of under 300 px in its tiles."""

    def _one(self, image):
        from skimage.measure import label, regionprops

        out = OracleModel._one(image)
        areas = [r.area for r in regionprops(label(image[0].numpy() < 0.5))]
        keep = torch.tensor([a >= 300 for a in areas], dtype=torch.bool)
        return {**out, "boxes": out["boxes"][keep], "scores": out["scores"][keep], "masks": out["masks"][keep]}


@pytest.mark.parametrize("mpp, lab_mpp", [(0.3, 0.2), (None, 0.0)])  # a lab model's; unknown µm/px
def test_the_scale_is_measured_again_at_the_zoom_the_first_pass_gave(monkeypatch, mpp, lab_mpp):
    import napari_bach.scale as scale

    # a third 21 px squares, two thirds 15 px (14 px boxes): at its own scale (or the
    # model's, when unknown) the detector sees only the large ones; zoomed by them it sees
    # all, whose median is small
    squares = [(y, x, SIDE if i % 3 == 0 else 15) for i, (y, x, _) in enumerate(SQUARES)]
    model = MissesSmallNuclei(tiny_config(mpp=0.3, nucleus_diameter_um=9.0, lab_mpp=lab_mpp))
    rgb = image_with_squares((600, 600), squares)
    small, large = np.sqrt(4 * 14**2 / np.pi), np.sqrt(4 * 20**2 / np.pi)
    assert predict(rgb, model, mpp).scale_estimate == pytest.approx(9.0 / small, rel=0.05)  # boxes ±1 px
    monkeypatch.setattr(scale, "PASSES", 1)
    assert predict(rgb, model, mpp).scale_estimate == pytest.approx(9.0 / large, rel=0.03)  # biased by the misses
