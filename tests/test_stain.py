"""Stain normalisation as a model setting: estimated per image (or slide), applied to every
tile at inference exactly as to the training images."""
import numpy as np
import pytest
import torch

from napari_bach.checkpoint import ModelInfo, load_checkpoint, save_checkpoint
from napari_bach.config import ModelConfig
from napari_bach.model import build_model
from napari_bach.predict import drain, iter_predict, predict
from napari_bach.stain import estimate_stain, median_stain, normalise_rgb, normalise_stain
from napari_bach.synthetic import synthetic_he
from src_train.augment import AugmentConfig, colour_cast
from src_train.datasets import Sample
from src_train.train import TrainConfig, Trainer
from conftest import OracleModel, tiny_config


def _cast(rgb: np.ndarray, per_channel=(1.35, 1.0, 0.7)) -> np.ndarray:
    return colour_cast(rgb, per_channel)  # another scanner's colour: a purple cast by default


def test_a_colour_cast_is_undone_and_glass_stays_white():
    rgb, truth = synthetic_he((384, 384), mpp=0.3, seed=1)
    reference = estimate_stain(rgb)
    nuclei = truth > 0
    colour = lambda a: a[nuclei].astype(float).mean(0)  # noqa: E731  (the nuclei's mean RGB)
    for per_channel in [(1.35, 1.0, 0.7), (0.8, 1.0, 1.3)]:  # purple and pink casts
        cast = _cast(rgb, per_channel)
        back = normalise_rgb(cast, estimate_stain(cast), reference)
        before = np.abs(colour(cast) - colour(rgb)).max()
        after = np.abs(colour(back) - colour(rgb)).max()
        assert before > 15 and after < before / 3, (before, after)
    same = normalise_rgb(rgb, reference, reference)  # its own stain: nearly unchanged
    assert np.abs(same.astype(float) - rgb).mean() < 6
    white = normalise_stain(torch.ones(3, 2, 2), estimate_stain(_cast(rgb)), reference)
    assert float(white.min()) > 0.95


def test_glass_has_no_stain_and_is_left_alone():
    glass = np.full((300, 300, 3), 248, np.uint8)
    assert estimate_stain(glass) is None
    assert normalise_rgb(glass, None, (0.65, 0.70, 0.29, 0.07, 0.99, 0.11, 1.9, 1.0)) is glass
    with pytest.raises(ValueError, match="no image"):
        median_stain([None, None])


def test_config_and_checkpoint_keep_the_reference(tmp_path):
    target = (0.65, 0.70, 0.29, 0.07, 0.99, 0.11, 1.9, 1.0)
    with pytest.raises(ValueError, match="stain_norm"):
        ModelConfig(stain_norm="reinhard")
    with pytest.raises(ValueError, match="8 numbers"):
        ModelConfig(stain_norm="macenko", stain_target=(1.0, 2.0))
    model = build_model(tiny_config(stain_norm="macenko", stain_target=target))
    save_checkpoint(tmp_path / "m.pt", model, ModelInfo())
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config.stain_norm == "macenko" and loaded.config.stain_target == pytest.approx(target)


def test_every_tile_the_model_sees_is_normalised_from_the_image_stain():
    rgb, _ = synthetic_he((224, 224), mpp=0.4, seed=2)  # one tile, padded with glass
    cast = _cast(rgb)
    target = estimate_stain(synthetic_he((384, 384), mpp=0.4, seed=3)[0])
    model = OracleModel(tiny_config(stain_norm="macenko", stain_target=target, tile_size=256))
    predict(cast, model, 0.4)
    tile = torch.ones(3, 256, 256)
    tile[:, :224, :224] = torch.from_numpy(cast).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(model.seen, normalise_stain(tile, estimate_stain(cast), target))
    drain(iter_predict(cast, model, 0.4, stain=target))  # a slide passes its stain, estimated once for all blocks
    torch.testing.assert_close(model.seen, normalise_stain(tile, target, target))
    plain = OracleModel(tiny_config(tile_size=256))
    predict(cast, plain, 0.4)
    torch.testing.assert_close(plain.seen, tile)  # stain_norm "none": the tile as it is
    with pytest.raises(ValueError, match="no reference stain"):
        predict(cast, OracleModel(tiny_config(stain_norm="macenko", tile_size=256)), 0.4)


def test_training_fits_the_reference_on_its_images_and_normalises_them(tmp_path):
    samples = [Sample(*synthetic_he((160, 160), mpp=0.4, seed=i), mpp=0.4, name=f"s{i}") for i in range(3)]
    samples[1].image = _cast(samples[1].image)
    cfg = TrainConfig(out=str(tmp_path), max_steps=1, checkpoint_every=1000, val_every=1000)
    cfg.augment = AugmentConfig(crop=128)
    trainer = Trainer(tiny_config(stain_norm="macenko"), cfg, samples, [])
    target = trainer.model.config.stain_target
    assert len(target) == 8 and trainer.model_cfg.stain_target == target
    assert target == pytest.approx(median_stain([estimate_stain(s.image) for s in samples]))
    assert not np.array_equal(trainer.train[1].image, samples[1].image)  # the cast image was mapped
    # a warm start from a normalising model keeps its reference
    again = Trainer(tiny_config(stain_norm="macenko", stain_target=target), cfg, samples[:1], [])
    assert again.model.config.stain_target == target
