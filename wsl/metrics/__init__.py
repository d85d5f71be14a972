"""Metrics: classification AP, localization (points, boxes, pixels) and segmentation IoU.

Everything here works on plain numpy arrays (OpenCV finds wsolevaluation's contours), so any tool's
outputs can be scored; :mod:`wsl.bench` feeds it CAMs from a model or from ``.npz`` files and writes the
reports.
"""
from wsl.metrics.classification import average_precision, mean_average_precision
from wsl.metrics.localization import (
    DEFAULT_PROTOCOL,
    IOU_THRESHOLDS,
    POINT_TOLERANCE,
    POINTING_TOLERANCE,
    PROTOCOL_NAMES,
    BoxAccuracy,
    PixelAP,
    box_sweep,
    component_box_ious,
    contour_box_sweep,
    contour_boxes,
    default_thresholds,
    normalize_map,
    per_class_accuracy,
    point_hits_region,
    point_in_boxes,
    point_localization_ap,
    wsol_iou,
)
from wsl.metrics.segmentation import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

__all__ = [
    "DEFAULT_PROTOCOL", "IOU_THRESHOLDS", "POINT_TOLERANCE", "POINTING_TOLERANCE", "PROTOCOL_NAMES", "BoxAccuracy",
    "PixelAP", "average_precision", "box_sweep", "component_box_ious", "confusion_matrix", "contour_box_sweep",
    "contour_boxes", "default_thresholds", "iou_per_class", "mean_average_precision", "mean_iou", "normalize_map",
    "per_class_accuracy", "pixel_accuracy", "point_hits_region", "point_in_boxes", "point_localization_ap",
    "wsol_iou",
]
