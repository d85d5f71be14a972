"""WSLClassifier: maps and scores, config, checkpoint round trip and refusals."""
import dataclasses
import os

import pytest
import torch

from wsl.errors import CheckpointError
from wsl.models import (ClassifierConfig, POOLINGS, build_classifier, build_segmenter, classifier_checkpoint,
                        load_classifier, segmenter_checkpoint)
from wsl.utils.io import save_checkpoint

CLASSES = ["disc", "square", "triangle"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_classifier(backbone="vgg_tiny", num_classes=3, pooling="lse",
                            pooling_kwargs={"beta": 4.0, "learnable": True}, output_stride=16)


def test_forward_is_pooling_of_class_maps(model):
    model.eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        maps = model.class_maps(x)
        scores = model(x)
    assert maps.shape == (2, 3, 4, 5)
    torch.testing.assert_close(scores, model.pooling(maps))
    assert (model.stride, model.offset) == (16, 7.5) == (model.backbone.stride, model.backbone.offset)


@pytest.mark.parametrize("pooling", POOLINGS.names())
def test_every_pooling_trains_end_to_end(pooling):
    model = build_classifier(backbone="vgg_tiny", num_classes=2, pooling=pooling)
    scores = model(torch.randn(2, 3, 32, 32))
    assert scores.shape == (2, 2)
    torch.nn.functional.binary_cross_entropy_with_logits(scores, torch.ones(2, 2)).backward()
    assert model.head.weight.grad.abs().sum() > 0


def test_multi_maps_are_averaged_per_class():
    model = build_classifier(backbone="vgg_tiny", num_classes=3, maps_per_class=4).eval()
    assert model.head.out_channels == 12
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        raw = model.head(model.backbone(x))  # (1, 12, h, w): the 4 maps of class c are channels 4c..4c+3
        torch.testing.assert_close(model.class_maps(x), raw.reshape(1, 3, 4, *raw.shape[-2:]).mean(2))


def test_config_is_frozen_and_validated(model):
    cfg = model.config
    assert cfg == ClassifierConfig(backbone="vgg_tiny", num_classes=3, pooling="lse",
                                   pooling_kwargs={"beta": 4.0, "learnable": True}, maps_per_class=1,
                                   backbone_kwargs={"output_stride": 16})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_classes = 5
    with pytest.raises(ValueError, match="unknown backbone 'vgg99'; known:"):
        ClassifierConfig(backbone="vgg99", num_classes=3)
    with pytest.raises(ValueError, match="unknown pooling 'gem'; known: avg, lse"):
        ClassifierConfig(backbone="vgg_tiny", num_classes=3, pooling="gem")
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        ClassifierConfig(backbone="vgg_tiny", num_classes=0)
    with pytest.raises(ValueError, match="maps_per_class"):
        ClassifierConfig(backbone="vgg_tiny", num_classes=3, maps_per_class=0)
    with pytest.raises(ValueError, match="pass weights= to build_classifier"):
        ClassifierConfig(backbone="vgg_tiny", num_classes=3, backbone_kwargs={"weights": "x.pth"})


def test_checkpoint_round_trip(model, tmp_path):
    with torch.no_grad():
        model.pooling.log_beta.add_(0.5)  # a trained, learnable beta must survive the round trip
    ckpt = classifier_checkpoint(model, CLASSES, epoch=7, metrics={"map": 0.5})
    assert ckpt["kind"] == "wsl.classifier" and ckpt["epoch"] == 7
    path = tmp_path / "clf.pt"
    save_checkpoint(path, ckpt)
    loaded, classes = load_classifier(path, expect_classes=CLASSES, expect_config={"backbone": "vgg_tiny"})
    assert classes == CLASSES and loaded.config == model.config
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    # a dict works too, and the whole config can be the expectation
    assert load_classifier(ckpt, expect_config=model.config, expect_classes=3)[1] == CLASSES


def test_checkpoint_arguments_checked(model):
    with pytest.raises(ValueError, match="2 class names for a model with 3 classes"):
        classifier_checkpoint(model, CLASSES[:2])
    with pytest.raises(ValueError, match="extra key 'model' is reserved"):
        classifier_checkpoint(model, CLASSES, model={})


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_refuses_other_backbone_and_classes(model, tmp_path):
    path = tmp_path / "clf.pt"
    save_checkpoint(path, classifier_checkpoint(model, CLASSES))
    with pytest.raises(CheckpointError) as exc:
        load_classifier(path, expect_config={"backbone": "vgg16"})
    assert f"{path}: made for another model: backbone='vgg_tiny' (expected 'vgg16')" == _one_line(exc)
    with pytest.raises(CheckpointError) as exc:
        load_classifier(path, expect_classes=20)
    assert "3 classes [disc, square, triangle] (expected 20)" in _one_line(exc)
    with pytest.raises(CheckpointError, match=r"expected 3: \[disc, square, star\]"):
        load_classifier(path, expect_classes=["disc", "square", "star"])
    with pytest.raises(ValueError, match="unknown field 'depth'"):
        load_classifier(path, expect_config={"depth": 3})


def test_refuses_segmenter_and_plain_state_dict(tmp_path):
    seg = build_segmenter("fcn32s", num_classes=4, backbone="vgg_tiny")
    path = tmp_path / "seg.pt"
    save_checkpoint(path, segmenter_checkpoint(seg, CLASSES))
    with pytest.raises(CheckpointError) as exc:
        load_classifier(path)
    assert _one_line(exc) == f"{path}: holds a segmenter, expected a classifier checkpoint ('wsl.classifier')"
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="holds no wsl kind \\(keys: weight\\)"):
        load_classifier(plain)


def test_refuses_tampered_checkpoints(model, tmp_path):
    ckpt = classifier_checkpoint(model, CLASSES)
    with pytest.raises(CheckpointError, match="lists 2 classes but its config has num_classes=3"):
        load_classifier({**ckpt, "classes": CLASSES[:2]})
    with pytest.raises(CheckpointError, match="not a valid ClassifierConfig"):
        load_classifier({**ckpt, "config": {**ckpt["config"], "backbone": "vgg99"}})
    state = dict(ckpt["model"])
    state["head.weight"] = torch.zeros(5, 256, 1, 1)
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        load_classifier({**ckpt, "model": state})
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "nope.pt")


class _RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"kind": "wsl.classifier", "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_classifier(path)
    assert not os.path.exists(marker)
