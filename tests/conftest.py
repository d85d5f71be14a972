"""Shared fixtures: a tiny generated dataset in the VOC 2012 + COCO layouts (built once per session).

Use it as ``build_dataset(f"voc:{scenes_root}", "train")`` or
``COCODataset(scenes_root / "coco" / "instances_val.json", scenes_root / "VOCdevkit/VOC2012/JPEGImages")``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from wsl.data.synth import SynthConfig, generate_scenes

#: 16 train / 8 val images of 64x64 pixels, 4 classes (disc, square, triangle, star).
TINY_SCENES = SynthConfig(seed=0, train=16, val=8, size=64, num_classes=4)


@pytest.fixture(scope="session")
def scenes_config() -> SynthConfig:
    return TINY_SCENES


@pytest.fixture(scope="session")
def scenes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding ``VOCdevkit/VOC2012``, ``coco/`` and ``synth.json`` of :data:`TINY_SCENES`.

    Shared by the whole session: treat it as read-only (copy it before corrupting files).
    """
    return generate_scenes(tmp_path_factory.mktemp("scenes") / "tiny", TINY_SCENES, progress=False)
