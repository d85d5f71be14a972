"""The :data:`SEGMENTERS` registry on its own, so each family file (``fcn.py``, ``deeplab.py``, ...)
can register its builders without importing the package that imports it."""
from __future__ import annotations

from wsl.registry import Registry

SEGMENTERS = Registry("segmenter")

__all__ = ["SEGMENTERS"]
