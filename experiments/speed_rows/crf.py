"""Rows C: the dense CRF (``wsl.cam.DenseCRF``) / pydensecrf2 (optional), label agreement and load beside
each ratio; and the CRF work of the demo's pseudo-mask stage, now / before issue 17.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import wsl.cam.crf
from wsl.cam import normalize_cams
from wsl.cam.crf import UNARY_CLIP, DenseCRF, crf_pseudo_masks
from wsl.data.synth import SynthConfig, render_scene

from speed_rows.settings import REPO, Settings
from speed_rows.timing import interleaved, row, set_threads, stats, with_threads


# The last commit with the CRF of sparse CSR products and a separable-convolution spatial kernel, i.e.
# before issue 17: the "before" side of the demo workload row (read with git; skipped without it).
CRF_BEFORE = "dfc51513c463fb48bc6cb6f8d41ae321508ceafa"


def module_at(commit: str, path: str, name: str) -> Any:
    """The module ``path`` of this repository as it was at ``commit`` (``git show``); LookupError when
    git or the commit is not there (a shallow clone, an unpacked archive)."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise LookupError(f"{path} at commit {commit[:7]} is not readable with git here ({e})") from e
    module = types.ModuleType(name)
    module.__file__ = f"{commit[:7]}:{path}"
    sys.modules[name] = module  # its dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def crf_scene(labels: int, h: int, w: int, seed: int = 0) -> Tuple[np.ndarray, torch.Tensor]:
    """A photograph (matplotlib's sample grace_hopper.jpg, centre-cropped to ``h x w``; matplotlib is a
    core dependency) and CAM-like unaries: ``labels`` smooth random logit fields (a 6x8 grid of
    N(0, 2.5^2) values, bicubically upsampled), softmaxed. The CRF changes ~15% of their argmax."""
    from matplotlib import cbook
    from PIL import Image

    photo = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))
    top, left = (photo.shape[0] - h) // 2, (photo.shape[1] - w) // 2
    image = np.ascontiguousarray(photo[top:top + h, left:left + w])
    g = torch.Generator().manual_seed(seed)
    logits = F.interpolate(2.5 * torch.randn(1, labels, 6, 8, generator=g), size=(h, w), mode="bicubic",
                           align_corners=False)
    return image, torch.softmax(logits, 1)


def pydensecrf_refine(image: np.ndarray, probs: torch.Tensor, crf: DenseCRF) -> np.ndarray:
    """pydensecrf2 (Krähenbühl's C++ code) with ``crf``'s parameters, as DeepLab calls it."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    k, h, w = probs.shape[1:]
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(unary_from_softmax(probs[0].numpy(), clip=UNARY_CLIP))
    d.addPairwiseGaussian(sxy=crf.pos_xy_std, compat=crf.pos_w)
    d.addPairwiseBilateral(sxy=crf.bi_xy_std, srgb=crf.bi_rgb_std, rgbim=image, compat=crf.bi_w)
    return np.asarray(d.inference(crf.iterations)).reshape(k, h, w)


def demo_pseudo_mask_batches(s: Settings) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The CRF's work in the demo's pseudo-mask stage: its train scenes (``SynthConfig()``) in batches of
    ``CamSection.batch_size`` (16), tagged with their classes, each tagged class's map a stand-in CAM
    (its ground-truth mask blurred, sigma 8 px, max-normalised: same sizes and label counts as the
    classifier's maps, without training one)."""
    cfg, out = SynthConfig(), []
    for start in range(0, s.crf_demo_images, 16):
        scenes = [render_scene(cfg, "train", i) for i in range(start, min(start + 16, s.crf_demo_images))]
        images = torch.from_numpy(np.stack([sc.image for sc in scenes])).permute(0, 3, 1, 2).contiguous()
        cams = torch.zeros(len(scenes), cfg.num_classes, cfg.height, cfg.size)
        positive = torch.zeros(len(scenes), cfg.num_classes, dtype=torch.bool)
        for i, sc in enumerate(scenes):
            for c in {o["cls"] for o in sc.objects}:
                positive[i, c] = True
                blurred = cv2.GaussianBlur((sc.class_mask == c + 1).astype(np.float32), (0, 0), 8)
                cams[i, c] = torch.from_numpy(blurred)
        out.append((images, normalize_cams(cams), positive))
    return out


def phase_crf(s: Settings) -> Dict[str, Any]:
    """``wsl.cam.DenseCRF`` against pydensecrf2 on a photograph (labels agreement beside each ratio),
    with torch on one thread and on all usable cores (pydensecrf runs on one), and the CRF work of the
    demo's pseudo-mask stage now and before issue 17."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError as e:
        return {"rows": [], "info": {}, "skipped": {
            "crf": f"pydensecrf2 not importable ({e}); pip install 'wsl[crf-reference]' for these rows"}}
    h, w = s.crf_size
    crf, rows, skipped = DenseCRF(), [], {}
    info: Dict[str, Any] = {"image": f"grace_hopper.jpg (matplotlib sample data), centre crop {w}x{h}",
                            "crf": repr(crf), "agreement": {}}
    cores = len(os.sched_getaffinity(0))
    before_threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        if cores > 1:
            # What parallel torch ops cost here: on a CPU shared with other jobs, the threads of a parallel
            # region wait at its end for peers that another job has descheduled, whatever the op computes.
            a, b = torch.randn(h * w * 3), torch.randn(h * w * 3)  # a 3-label table of the photograph

            def adds() -> None:
                for _ in range(20):
                    torch.add(a, b)
            t = interleaved({"all": lambda: with_threads(cores, adds), "one": lambda: with_threads(1, adds)},
                            repeats=s.repeats, warmup=s.warmup)
            load = [round(x, 2) for x in os.getloadavg()]
            rows.append(row("C", f"20 elementwise torch ops on {h * w * 3} floats (adds), torch on {cores} threads "
                            "/ on 1", f"{cores} threads", stats(t["all"], cpu=False), "1 thread",
                            stats(t["one"], cpu=False),
                            note=f"load {load}: every parallel op of the all-core CRF rows below pays this"))
        for threads in dict.fromkeys((1, cores)):
            set_threads(threads)
            for k in s.crf_labels:
                image, probs = crf_scene(k, h, w)
                img = torch.from_numpy(image).permute(2, 0, 1)[None]
                ours, ref = crf(img, probs)[0].argmax(0).numpy(), pydensecrf_refine(image, probs, crf).argmax(0)
                agree = float((ours == ref).mean())
                info["agreement"][f"{k} labels"] = agree
                fns = {"wsl": lambda: crf(img, probs), "ref": lambda: pydensecrf_refine(image, probs, crf)}
                if threads == 1 and k == s.crf_labels[-1]:
                    # A first call at a new image size also builds the spatial lattice (kept per size).
                    fns["cold"] = lambda: (wsl.cam.crf._spatial_lattice.cache_clear(), crf(img, probs))
                t = interleaved(fns, repeats=s.repeats, warmup=s.warmup)
                load = [round(x, 2) for x in os.getloadavg()]
                what = (f"dense CRF {w}x{h}, {k} labels, {crf.iterations} iterations, DeepLab parameters: "
                        f"wsl.cam.DenseCRF (torch, {threads} thread{'s' if threads > 1 else ''}) / pydensecrf2")
                note = f"labels agree on {100 * agree:.2f}% of pixels; load {load}"
                rows.append(row("C", what, "wsl", stats(t["wsl"], cpu=threads == 1), "pydensecrf2 (1 thread)",
                                stats(t["ref"], cpu=threads == 1), "<=", 1.0, note=note))
                if "cold" in t:
                    rows.append(row("C", what + ", first call at this image size", "wsl, spatial lattice rebuilt",
                                    stats(t["cold"]), "pydensecrf2 (1 thread)", stats(t["ref"]), note=note))
        set_threads(before_threads[0])
        # The demo's pseudo-mask stage (wsl.pipeline: export_cams with DenseCRF(), mask_bg 0.15): the CRF
        # work of its 600 train images, this CRF and the one before issue 17, batch by batch alternately.
        try:
            old = module_at(CRF_BEFORE, "wsl/cam/crf.py", "speed_crf_before")
        except LookupError as e:
            skipped["crf demo workload"] = str(e)
        else:
            totals = {"now": {"wall": [0.0], "cpu": [0.0]}, "before": {"wall": [0.0], "cpu": [0.0]}}
            same = pixels = 0
            fns = {"now": lambda b: crf_pseudo_masks(crf, *b, method="threshold", bg=0.15),
                   "before": lambda b: old.crf_pseudo_masks(old.DenseCRF(), *b, method="threshold", bg=0.15)}
            batches = demo_pseudo_mask_batches(s)
            for name in fns:  # warm-up
                fns[name](batches[0])
            for i, batch in enumerate(batches):
                masks = {}
                for name in (("now", "before") if i % 2 == 0 else ("before", "now")):
                    t0, c0 = time.perf_counter(), time.process_time()
                    masks[name] = fns[name](batch)
                    totals[name]["wall"][0] += time.perf_counter() - t0
                    totals[name]["cpu"][0] += time.process_time() - c0
                same += int((masks["now"] == masks["before"]).sum())
                pixels += masks["now"].numel()
            rows.append(row("C", f"the demo's pseudo-mask stage, CRF work of {s.crf_demo_images} train images "
                            "(128 px, 16 per batch, 2 background settings): DenseCRF now / before issue 17 "
                            f"(commit {CRF_BEFORE[:7]})", "now", stats(totals["now"]), "before",
                            stats(totals["before"]), "<=", 1.0,
                            note=f"stand-in CAMs (blurred ground truth); pseudo-masks agree on "
                                 f"{100 * same / max(pixels, 1):.2f}% of pixels; load "
                                 f"{[round(x, 2) for x in os.getloadavg()]}; threads {torch.get_num_threads()}"))
    finally:
        set_threads(before_threads[0])
        cv2.setNumThreads(before_threads[1])
    return {"rows": rows, "info": info, "skipped": skipped}
