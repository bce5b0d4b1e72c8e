"""Colour robustness: the augmentation's colour fields, the stain-stress group and the
warning for images coloured unlike the training images (issue 26)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_bach.colour import check_colours
from napari_bach.synthetic import synthetic_he
from src_train.augment import AugmentConfig, jitter_colour, perturbed_stain_vectors, to_tensor
from src_train.stress import STRESS, stressed

PLAIN = dict(stain_sigma=0.0, hue=0.0, saturation=0.0, contrast=0.0, brightness=0.0, blur_p=0.0, sharpen_p=0.0,
             jpeg_p=0.0, gray_p=0.0)


@pytest.fixture(scope="module")
def he():
    return synthetic_he((256, 256), seed=3)[0]


def test_gray_p_makes_three_equal_channels(he):
    out = jitter_colour(to_tensor(he), torch.Generator().manual_seed(0), AugmentConfig(**{**PLAIN, "gray_p": 1.0}))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert out.std() > 0.05  # grayscale, not blank


def test_channel_gain_scales_each_channel_alike_everywhere(he):
    x = to_tensor(he) * 0.8  # no clipping at 1
    out = jitter_colour(x, torch.Generator().manual_seed(1), AugmentConfig(**{**PLAIN, "channel_gain": 0.2}))
    ratio = (out / x.clamp(min=1e-3)).flatten(1)
    gains = ratio.median(1).values
    assert torch.all((gains > 0.79) & (gains < 1.21)) and ratio.std(1).max() < 0.01


def test_stain_vectors_change_the_colour_of_each_stain_not_the_geometry(he):
    vectors = perturbed_stain_vectors(torch.Generator().manual_seed(2), 0.3)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3))
    cfg = AugmentConfig(**{**PLAIN, "stain_vector": 0.3})
    out = jitter_colour(to_tensor(he), torch.Generator().manual_seed(2), cfg)
    stained = he.min(-1) < 180
    assert (out - to_tensor(he)).abs().permute(1, 2, 0).numpy()[stained].mean() > 0.02
    glass = he.min(-1) > 235  # white stays (nearly) white: the vectors scale stain, not light
    assert (out.permute(1, 2, 0).numpy()[glass] > 0.85).all()


@pytest.mark.parametrize("field,value", [("hue", 0.6), ("gray_p", 1.5), ("stain_vector", 1.0), ("channel_gain", -0.1)])
def test_impossible_colour_strengths_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})


def test_train_cli_refuses_impossible_colour_flags(capsys):
    from src_train.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--monuseg", "x", "--hue", "0.7"])
    assert exit_info.value.code == 2 and "hue" in capsys.readouterr().err


def test_stress_transforms_are_fixed_and_keep_labels(he):
    from src_train.datasets import Sample

    labels = np.zeros(he.shape[:2], np.int32)
    labels[10:20, 10:20] = 1
    sample = Sample(he, labels, 0.42, group="g")
    for name, fn in STRESS.items():
        once, twice = fn(he), fn(he)
        assert once.shape == he.shape and once.dtype == np.uint8 and np.array_equal(once, twice), name
        assert not np.array_equal(once, he), name
        (moved,) = stressed([sample], name)
        assert moved.labels is labels and moved.mpp == 0.42 and moved.group == "g"
    gray = STRESS["grayscale"](he)
    assert np.array_equal(gray[..., 0], gray[..., 1])
    glass = STRESS["maroon-lavender"](np.full((4, 4, 3), 255, np.uint8))[0, 0]
    assert glass[2] > glass[0] > glass[1]  # lavender: blue over red over green


def test_colour_warning_flags_a_recoloured_image_and_not_a_normal_one(he):
    normal = check_colours(he)
    assert normal.ok and normal.h_angle is not None
    maroon = check_colours(STRESS["maroon-lavender"](he))
    assert not maroon.ok and "hematoxylin" in maroon.warning and "unreliable" in maroon.warning
    from torchvision.transforms.v2 import functional as TF

    turned = TF.adjust_hue(to_tensor(he), 0.3).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert not check_colours(turned).ok
    assert check_colours(np.full((64, 64, 3), 250, np.uint8)).ok  # glass only: nothing to judge, no warning


def test_segment_cli_writes_the_colour_warning_to_the_summary(tmp_path, tiny_checkpoint, he):
    import csv

    from PIL import Image

    from napari_bach.cli import main

    Image.fromarray(he).save(tmp_path / "plain.png")
    Image.fromarray(STRESS["maroon-lavender"](he)).save(tmp_path / "maroon.png")
    assert main(["segment", str(tmp_path / "plain.png"), str(tmp_path / "maroon.png"), "--out", str(tmp_path / "o"),
                 "--model", str(tiny_checkpoint), "--tissue-model", "none", "--mpp", "0.42"]) == 0
    with open(tmp_path / "o" / "summary.csv") as fh:
        rows = {r["image"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}
    assert rows["plain.png"]["colour_warning"] == ""
    assert "unreliable" in rows["maroon.png"]["colour_warning"] and "segmented as grayscale" in rows["maroon.png"]["colour_warning"]


def test_unfamiliar_colours_are_segmented_as_a_grayscale_copy_and_familiar_ones_as_they_are(he):
    from napari_bach.colour import model_input

    same, grayed = model_input(he, check_colours(he))
    assert same is he and not grayed
    maroon = STRESS["maroon-lavender"](he)
    pixels, grayed = model_input(maroon, check_colours(maroon))
    assert grayed and np.array_equal(pixels[..., 0], pixels[..., 2]) and pixels.shape == maroon.shape
    kept, grayed = model_input(maroon, check_colours(maroon), gray_pass=False)
    assert kept is maroon and not grayed


def test_the_grayscale_pass_waits_for_an_unfamiliar_hematoxylin(he):
    """Eosin alone off (as a +0.08 hue turn gives two held-out images): colour still helps
    the nuclei, so the image is segmented as it is."""
    from napari_bach.colour import ColourCheck, model_input

    eosin_only = ColourCheck(h_angle=8.7, e_angle=27.0, warning="eosin 27° from the training images'")
    kept, grayed = model_input(he, eosin_only)
    assert kept is he and not grayed
    assert model_input(he, ColourCheck(h_angle=20.2, e_angle=10.0, warning="hematoxylin 20°"))[1]
