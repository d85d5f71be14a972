"""Datasets with one sample interface: VOC 2012, COCO, plain tags files and generated scenes."""
