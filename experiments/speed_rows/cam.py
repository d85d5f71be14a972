"""Rows 1a-1f: CAM export (what ``wsl cam`` computes per batch: forward passes, the used classes' maps
upsampled, points, local maxima, boxes, pseudo-masks) / a plain forward pass of the same model, by
model, layout and number of classes; and what one image's CAM file costs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import torch

from wsl.cam import CAMExtractor, argmax_points, cam_boxes, local_maxima, pseudo_masks
from wsl.cam.extract import select_maps
from wsl.cam.export import ExportOptions, all_class_maps, localize
from wsl.cam.files import cam_npz_bytes, packed_cam_npz_bytes

from speed_rows.settings import Settings, build_model, forward_only, scene_batch
from speed_rows.timing import autocast, interleaved, row, stats


def cam_pipeline(model: torch.nn.Module, opt: ExportOptions = ExportOptions(), channels_last: bool = True) -> Callable:
    """The per-batch work of ``wsl cam`` (wsl.cam.export._Writer.batch) minus file writing: the forward
    passes, then ``localize`` (maps of the used classes upsampled, points, boxes, pseudo-masks)."""
    extractor = CAMExtractor(model, scales=opt.scales, flip=opt.flip, channels_last=channels_last)

    def run(images: torch.Tensor, positive: torch.Tensor) -> Any:
        return localize(extractor.class_maps(images), positive, opt)
    return run


def phase_cam(s: Settings, device: torch.device, amp: Optional[torch.dtype] = None) -> Dict[str, Any]:
    rows, info, cpu = [], {}, device.type == "cpu"
    # 1c: the demo model without channels_last, the layout CAMExtractor used before it became the default
    for key, spec, cl in (("vgg16", s.vgg16 if cpu else s.cuda, True), ("tiny", s.tiny, True),
                          ("tiny_nchw", s.tiny, False)):
        model = build_model(spec, device).eval()
        batch = scene_batch(spec, device)
        x = batch["image"].contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        positive = batch["labels"] > 0.5
        pipeline, forward = cam_pipeline(model, channels_last=cl), forward_only(model)
        repeats = s.heavy_repeats if spec.backbone == "vgg16" else s.repeats
        with torch.inference_mode():
            map_size = list(model.class_maps(x[:1]).shape[-2:])
        with autocast(device, amp):
            t = interleaved({"forward": lambda: forward(x), "cam": lambda: pipeline(x, positive)},
                            repeats=repeats, warmup=s.warmup, device=device)
            if not cl:
                rows.append(row("1c", f"CAM export / forward, {spec.label}, batch {spec.batch}, NCHW (channels_last "
                                "off)", "CAM + points + boxes + pseudo-masks", stats(t["cam"], cpu=cpu),
                                "plain forward", stats(t["forward"], cpu=cpu), "<=", 1.10,
                                note="same post-processing after a slower forward pass"))
                del model
                continue
            # Where the extra time goes: each step of wsl cam's per-batch work on the same maps.
            extractor = CAMExtractor(model)
            maps = extractor.class_maps(x)
            used = select_maps(maps, positive)
            cams, valid = used.cams, used.valid
            opt = ExportOptions()
            parts = interleaved({
                "forward": lambda: forward(x),
                "class_maps (forward)": lambda: extractor.class_maps(x),
                "upsample + normalise the used maps": lambda: select_maps(maps, positive),
                "upsample + normalise every map (before issue 17)": lambda: maps.upsample(),
                "argmax_points": lambda: argmax_points(cams),
                "local_maxima": lambda: local_maxima(cams, min_distance=opt.peak_min_distance,
                                                     rel_threshold=opt.peak_threshold, top_k=opt.peak_top_k,
                                                     select=valid),
                "cam_boxes": lambda: cam_boxes(cams, tau=opt.tau, mode=opt.box_mode, select=valid),
                "pseudo_masks": lambda: pseudo_masks(cams, valid, method=opt.mask_method, fg=opt.mask_fg,
                                                     bg=opt.mask_bg, classes=used.classes)},
                repeats=repeats, warmup=1, device=device)
        rid = "1a" if key == "vgg16" else "1b"
        rows.append(row(rid, f"CAM export / forward, {spec.label}, batch {spec.batch}", "CAM + points + boxes + "
                        "pseudo-masks", stats(t["cam"], cpu=cpu), "plain forward", stats(t["forward"], cpu=cpu),
                        "<=", 1.10,
                        note=f"{int(positive.sum())} used of {spec.num_classes * spec.batch} class maps of "
                        f"{map_size[0]}x{map_size[1]} cells upsampled to {spec.size} px"))
        info[key] = {"spec": dataclasses.asdict(spec),
                     "breakdown_s": {k: stats(v, cpu=cpu) for k, v in parts.items()},
                     "map_size": map_size}
        del model
    return {"rows": rows, "info": info}


def phase_classes(s: Settings, device: torch.device) -> Dict[str, Any]:
    """Rows 1d-1f: CAM export / forward as the number of classes grows (random-init heads: speed does not
    depend on the weights). Only the used (tagged) classes' maps are upsampled, so the export's extra
    cost should not grow with C. 1f times one image's .npz bytes against that image's share of the
    forward pass, in both layouts (docs/design.md, "CAM files"): wsl-cams/2 (the default) keeps the
    used maps at image resolution and every class at map resolution, wsl-cams/1 (--full-maps) every
    class at image resolution, so only its cost grows with C at full size."""
    rows, info, cpu = [], {}, device.type == "cpu"
    opt = ExportOptions()
    for rid, base in (("1d", s.tiny), ("1e", s.vgg448)):
        repeats = s.heavy_repeats if base.backbone == "vgg16" else s.repeats
        for classes in s.class_counts:
            spec = dataclasses.replace(base, num_classes=classes)
            model = build_model(spec, device).eval()
            batch = scene_batch(spec, device)
            x = batch["image"].contiguous(memory_format=torch.channels_last)
            positive = batch["labels"] > 0.5
            pipeline, forward = cam_pipeline(model, opt), forward_only(model)
            t = interleaved({"forward": lambda: forward(x), "cam": lambda: pipeline(x, positive)},
                            repeats=repeats, warmup=s.warmup, device=device)
            maps = CAMExtractor(model).class_maps(x)
            used = localize(maps, positive, opt).used
            names = [f"c{k}" for k in range(classes)]
            slots = torch.nonzero(used.valid[0]).flatten().tolist()
            files = {  # image 0's file in each layout, as wsl cam's writer builds it (wsl.cam.files)
                "wsl-cams/2": lambda: packed_cam_npz_bytes(
                    used.cams[0, slots].numpy(), used.classes[0, slots].tolist(), names, maps.scores[0].numpy(),
                    maps.image_passes(0), maps.geometry()),
                "wsl-cams/1": lambda: cam_npz_bytes(all_class_maps(maps, used, 0), names, maps.scores[0].numpy())}
            f = interleaved(files, repeats=repeats, warmup=s.warmup, device=device)
            size = {k: len(fn()) for k, fn in files.items()}
            h, w = maps.passes[0][0].shape[-2:]
            what = f"{spec.label}, batch {spec.batch}, {classes} classes"
            rows.append(row(rid, f"CAM export / forward, {what}", "CAM + points + boxes + pseudo-masks",
                            stats(t["cam"], cpu=cpu), "plain forward", stats(t["forward"], cpu=cpu), "<=", 1.05,
                            note=f"{int(positive.sum())} used maps of {classes * spec.batch} upsampled from "
                                 f"{h}x{w} cells"))
            per_image = stats(t["forward"], scale=1.0 / spec.batch, cpu=cpu)
            rows.append(row("1f", f"one image's CAM file, wsl-cams/2 (wsl cam's default: {len(slots)} used maps at "
                            f"{spec.size} px + {classes} raw {h}x{w} maps) / its forward pass, {what}",
                            "float16, used maps deflated, raw maps stored", stats(f["wsl-cams/2"], cpu=cpu),
                            "plain forward / batch", per_image,
                            note=f"file of {size['wsl-cams/2'] / 2**20:.2f} MiB; not part of 1d/1e"))
            rows.append(row("1f", f"one image's CAM file, wsl-cams/1 (--full-maps: all {classes} maps at {spec.size} "
                            f"px) / its forward pass, {what}", "upsample the unused maps + float16 + deflate",
                            stats(f["wsl-cams/1"], cpu=cpu), "plain forward / batch", per_image,
                            note=f"file of {size['wsl-cams/1'] / 2**20:.2f} MiB; not part of 1d/1e"))
            info[f"{rid}_{classes}"] = {"spec": dataclasses.asdict(spec), "file_bytes": size}
            del model, maps, used
    return {"rows": rows, "info": info}
