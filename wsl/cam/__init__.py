"""CAMs to localization: extraction (one forward pass), points, boxes, pseudo-masks, dense CRF, export.

Typical use::

    from wsl.cam import CAMExtractor, cam_boxes, pseudo_masks, DenseCRF, crf_pseudo_masks
    out = CAMExtractor(model, scales=(1.0, 0.75), flip=True)(images)      # (N, C, H, W) in [0, 1]
    boxes = cam_boxes(out.cams, tau=0.5, select=labels > 0)               # per image: xyxy boxes
    masks = pseudo_masks(out.cams, labels > 0)                            # (N, H, W) uint8
    masks = crf_pseudo_masks(DenseCRF(), images_uint8, out.cams, labels > 0)
    out = build_cam_method("gradcam", model)(images, labels > 0)        # any CAM_METHODS name, same output
"""
from wsl.cam.crf import DenseCRF, crf_pseudo_masks
from wsl.cam.export import export_cams
from wsl.data.images import ImageFolderDataset
from wsl.cam.extract import (CAMExtractor, CAMOutput, normalize_cams, select_classes, selected_maps,
                             upsample_cams)
from wsl.cam.methods import CAM_METHODS, build_cam_method
from wsl.cam.postprocess import (Boxes, Points, argmax_points, background_scores, cam_boxes,
                                 local_maxima, pseudo_masks)

__all__ = [
    "CAMExtractor", "CAMOutput", "normalize_cams", "select_classes", "selected_maps", "upsample_cams",
    "Boxes", "Points", "argmax_points", "background_scores", "cam_boxes", "local_maxima", "pseudo_masks",
    "DenseCRF", "crf_pseudo_masks", "ImageFolderDataset", "export_cams", "CAM_METHODS", "build_cam_method",
]
