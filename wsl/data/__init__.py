"""Datasets with one sample interface: VOC 2007 / 2012 (and train_aug), COCO, plain tags files, class
folders, unlabelled image folders and generated scenes.

``build_dataset("voc:DIR" | "synth:DIR" | "coco:ANN_JSON:IMAGE_DIR" | "tags:FILE" | "folder:DIR", split)``
(all specs: :mod:`wsl.data.spec`) is the usual entry point; transforms live in :mod:`wsl.data.transforms` and the contact sheet in :mod:`wsl.data.viz`
(not imported here, to keep matplotlib out of DataLoader workers).
"""
from wsl.data.base import Annotation, WSLDataset, collate
from wsl.data.coco import COCODataset
from wsl.data.folder import ClassFolderDataset
from wsl.data.spec import SCHEMES, build_dataset
from wsl.data.synth import SynthConfig, format_summary, generate_scenes, summarize
from wsl.data.tags import TagsDataset
from wsl.data.voc import VOCDataset, find_voc_root

__all__ = [
    "Annotation", "WSLDataset", "collate", "COCODataset", "VOCDataset", "TagsDataset", "ClassFolderDataset",
    "find_voc_root", "SCHEMES", "build_dataset", "SynthConfig", "generate_scenes", "summarize", "format_summary",
]
