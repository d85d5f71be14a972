"""CAM methods by name: ours (one forward pass) and thin adapters over pytorch-grad-cam and torchcam.

Every entry of :data:`CAM_METHODS` builds a *map method*, a callable with one contract::

    method = build_cam_method("gradcam", model)          # or CAM_METHODS.build("gradcam", model=model)
    out = method(images, select)                          # a CAMOutput, as CAMExtractor returns
    out.cams    # float32 (N, C, H, W) at the images' resolution, each map normalised ("max": relu / max)
    out.scores  # float32 (N, C) image scores: the model's pooled logits, model(images)

``images`` are normalised float ``(N, 3, H, W)``; ``select`` is a bool ``(N, C)`` of the maps wanted (the
tagged classes when the data has labels), or None for the predicted ones (:func:`select_classes` on the
scores: logit > 0, at least the top class). ``wsl cam`` (:func:`wsl.cam.export.export_cams`) and ``wsl
bench`` (:class:`wsl.bench.ModelCamSource`) take any method, so the ``.npz`` files and the numbers are
the same format whichever computed them.

Names: ``cam`` is ours, the default (:class:`wsl.cam.extract.CAMExtractor`: the class maps are the
model's own output, so one forward pass gives every class's map, no hooks, no gradients).
pytorch-grad-cam's methods keep its names: ``gradcam``, ``gradcam++``, ``xgradcam``, ``layercam``,
``eigencam``, ``scorecam``. torchcam's are prefixed: ``torchcam:cam``, ``torchcam:gradcam``,
``torchcam:gradcam++``, ``torchcam:smoothgradcam++``, ``torchcam:xgradcam``, ``torchcam:layercam``,
``torchcam:scorecam`` (SS-CAM / IS-CAM, noise-averaged Score-CAMs, cost tens of Score-CAMs and are left
out; LeGrad is for vision transformers). Both libraries are the optional ``bench`` extra
(``pip install 'wsl[bench]'``); without it these names raise :class:`~wsl.errors.MissingExtraError`, one
line naming the extra.

Target layer. By default ``"backbone"``: the backbone's output, the features ``A`` (``K`` channels)
that feed the 1x1 class head, the layer CAM itself reads (``M_c = sum_k w_ck A_k + b_c``), at the same
resolution as our class maps; ``target_layer=`` (``--target-layer``) takes any name of
``model.named_modules()``, e.g. ``backbone.features.20`` (the last convolutional block of ``vgg_tiny``).

Classes computed. A gradient method (all but ``cam``, ``torchcam:cam`` and ``eigencam``) needs one backward
pass per class of an image, so computing every class would cost C backward passes per image. These
methods compute the maps of the selected classes only, in ``max_i #selected_i`` batched rounds (round
``r`` asks image ``i`` for its ``r``-th selected class), and leave the maps of the other classes at
zero. That leaves every ``wsl bench`` metric unchanged: point localization mAP ranks (image, class)
pairs by the image score, and a pair of a class absent from the image is a false positive wherever its
map peaks (a negative can never hit), while MaxBoxAcc(V2), PxAP, the pointing game, CorLoc, top-1
localization and pseudo-mask mIoU read only the tagged classes' maps. The one exception is ranking
point mAP by the map maximum (``--rank-by map``), which reads every map; ``wsl bench`` refuses it for
methods other than ``cam``. ``wsl cam`` writes points, boxes and masks of the selected classes only, as
with ``cam``. Activation-only methods (``torchcam:cam``, the Score-CAMs) compute only the selected
classes too (Score-CAM runs one forward pass per channel and class); ``eigencam`` is class-agnostic: its
one map per image is given to every selected class.

Upsampling. pytorch-grad-cam returns maps at input size (``cv2.resize`` of the min-max normalised map:
cell ``i`` sits at ``(i + 0.5) H / h - 0.5``, which is the network's own geometry ``offset + stride * i``
when ``offset = (stride - 1) / 2``, as for ``vgg_tiny`` with a side divisible by 8). torchcam returns
maps at the target layer's resolution; they are upsampled like our CAMs
(:func:`wsl.cam.extract.upsample_cams`: cell ``(i, j)`` at ``model.offset + model.stride * (i, j)``).
pytorch-grad-cam's maps arrive min-max normalised by the library (after its ReLU); torchcam's are taken
raw (``normalized=False``, after its ReLU for the gradient methods and Score-CAM). Every map is then
normalised with ``normalize`` (:func:`wsl.cam.extract.normalize_cams`; default ``max``, as ``wsl cam``
stores). A map that is positive everywhere (LayerCAM's often is) therefore differs between the two
libraries by an offset, which ``wsl bench`` removes: it min-max normalises every map itself.

Scores. The image scores are ``model(images)``: the output the libraries differentiate, which for our
classifiers is ``pooling(class_maps)``, the same as CAMExtractor's at one scale.

Hooks. The libraries attach forward hooks (and tensor hooks) to the model. An adapter attaches them only
for the duration of one call, inside :func:`hooks_removed`, a context manager that releases the
library's handles and then, in ``finally``, removes any hook the model did not have before (so also
after an exception, also if a library forgot one); it also gives every module back its train/eval mode
(pytorch-grad-cam sets ``model.eval()`` in its constructor) and every parameter its ``.grad``
(pytorch-grad-cam's ``loss.backward()`` writes parameter gradients). pytorch-grad-cam's own ``__exit__``
swallows ``IndexError``; it is not used.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsl.cam.extract import (CAMExtractor, CAMOutput, NORMALIZATIONS, _model_device, normalize_cams, select_classes,
                             upsample_cams)
from wsl.errors import MissingExtraError
from wsl.registry import Registry

logger = logging.getLogger(__name__)

CAM_METHODS = Registry("CAM method")
DEFAULT_METHOD = "cam"
DEFAULT_TARGET_LAYER = "backbone"
EXTRA = "pip install 'wsl[bench]'"
LIBRARIES = {"pytorch-grad-cam": "pytorch_grad_cam", "torchcam": "torchcam.methods"}
#: Seed of the input noise of ``torchcam:smoothgradcam++`` (so ``wsl cam`` files are reproducible).
NOISE_SEED = 0

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


# ------------------------------------------------------------------------------------------------ hooks
def count_hooks(model: nn.Module) -> int:
    """Forward, forward-pre, backward and backward-pre hooks registered on ``model`` and its submodules."""
    return sum(len(getattr(m, d, {})) for m in model.modules() for d in _HOOK_DICTS[:4])


@contextlib.contextmanager
def hooks_removed(model: nn.Module) -> Iterator[None]:
    """Run the body, then (in ``finally``) remove every module hook added to ``model`` meanwhile and give
    every module its train/eval mode and every parameter its ``.grad`` back.

    The adapters release the libraries' own handles first; whatever is still attached then (a library
    that forgot a handle, or raised between registering and returning it) is removed here and logged.
    """
    before = {(id(m), d): set(getattr(m, d, {})) for m in model.modules() for d in _HOOK_DICTS}
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        yield
    finally:
        left = 0
        for m in model.modules():
            for d in _HOOK_DICTS:
                table = getattr(m, d, None)
                if not table:
                    continue
                for key in set(table) - before.get((id(m), d), set()):
                    del table[key]
                    left += d in _HOOK_DICTS[:4]
        if left:
            logger.warning("removed %d hook(s) a CAM library left on the model", left)
        for p, g in grads:
            p.grad = g
        for m, training in modes:
            m.training = training


# ----------------------------------------------------------------------------------------------- helpers
def _pad_to_minimum(model: nn.Module, x: Tensor) -> Tensor:
    """Pad the bottom and right of an input smaller than ``model.min_input_size`` by repeating its border,
    as :class:`CAMExtractor` does (map cells keep their positions; the maps are cropped back)."""
    need = int(getattr(model, "min_input_size", 1))
    h, w = x.shape[-2:]
    if h >= need and w >= need:
        return x
    return F.pad(x, (0, max(0, need - w), 0, max(0, need - h)), mode="replicate")


def class_rounds(select: Tensor) -> List[List[int]]:
    """Class lists for batched per-class calls: round ``r`` asks image ``i`` for its ``r``-th selected class
    (its last one again when it has fewer, class 0 when it has none: those maps are discarded), so every
    selected (image, class) pair is covered in ``max_i #selected_i`` rounds."""
    chosen = [torch.nonzero(row).flatten().tolist() or [0] for row in select.cpu()]
    return [[c[min(r, len(c) - 1)] for c in chosen] for r in range(max(len(c) for c in chosen))]


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images must be a normalised float tensor (N, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")


def _check_select(select: Optional[Tensor], n: int, c: int) -> Optional[Tensor]:
    if select is None:
        return None
    select = torch.as_tensor(select).cpu()
    if tuple(select.shape) != (n, c):
        raise ValueError(f"select must be a bool (N, C) = ({n}, {c}) mask of the classes to compute, got shape "
                         f"{tuple(select.shape)}")
    return select.bool()


def import_library(library: str, method: str) -> Any:
    """The library's module, or :class:`MissingExtraError` (one line naming the extra to install)."""
    module = LIBRARIES[library]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"CAM method {method!r} needs {library} ({module} is not importable: {e}); "
                                f"{EXTRA}") from None


# ------------------------------------------------------------------------------------------------- ours
class OwnCAM:
    """``cam``: the classifier's own class maps, all classes from one forward pass per scale
    (:class:`wsl.cam.extract.CAMExtractor`; Zhou et al., "Learning Deep Features for Discriminative
    Localization", CVPR 2016: ``M_c = sum_k w_ck A_k + b_c``, read before the pooling). ``select`` is not
    needed: every map comes from the same pass."""

    name = DEFAULT_METHOD
    library = "wsl"
    gradients = False

    def __init__(self, model: nn.Module, *, scales: Sequence[float] = (1.0,), flip: bool = False,
                 normalize: str = "max", channels_last: bool = True) -> None:
        self.extractor = CAMExtractor(model, scales=scales, flip=flip, normalize=normalize,
                                      channels_last=channels_last)
        self.model = model

    def __call__(self, images: Tensor, select: Optional[Tensor] = None) -> CAMOutput:
        return self.extractor(images)

    def describe(self) -> str:
        e = self.extractor
        return f"cam (scales {list(e.scales)}, flip {e.flip}, {e.normalize} normalisation)"


def own_extractor(method: Any) -> Optional[CAMExtractor]:
    """The :class:`CAMExtractor` behind the ``cam`` method (``OwnCAM.extractor``), whose maps can be
    upsampled for the classes that are read only; None for the library methods (they fill the
    selected maps only)."""
    extractor = getattr(method, "extractor", None)
    return extractor if isinstance(extractor, CAMExtractor) else None


@CAM_METHODS.register(DEFAULT_METHOD)
def _build_cam(*, model: nn.Module, scales: Sequence[float] = (1.0,), flip: bool = False, normalize: str = "max",
               channels_last: bool = True) -> OwnCAM:
    return OwnCAM(model, scales=scales, flip=flip, normalize=normalize, channels_last=channels_last)


_build_cam.__doc__ = OwnCAM.__doc__


# ------------------------------------------------------------------------------------------- libraries
@dataclass(frozen=True)
class MethodSpec:
    """One library method: its registered ``name``, the ``library`` and class ``cls`` it calls, the
    ``paper`` and ``formula`` (for the docs), whether it needs ``gradients``, whether it is
    ``class_agnostic``, whether it runs image by image (``per_image``: its cost is per image and class
    anyway) and the keyword ``options`` it accepts with their defaults."""

    name: str
    library: str
    cls: str
    paper: str
    formula: str
    gradients: bool = True
    class_agnostic: bool = False
    per_image: bool = False
    options: Tuple[Tuple[str, Any], ...] = ()


_GRADCAM = "a_k^c = mean_ij dy_c/dA_k(i, j); M_c = ReLU(sum_k a_k^c A_k)"
_GRADCAMPP = ("a_k^c = sum_ij alpha_k^c(i, j) ReLU(g_k(i, j)), g = dy_c/dA, alpha_k^c(i, j) = g^2 / (2 g^2 + {}); "
              "M_c = ReLU(sum_k a_k^c A_k)")
_XGRADCAM = "a_k^c = sum_ij A_k(i, j) / (sum_ab A_k(a, b)) dy_c/dA_k(i, j); M_c = ReLU(sum_k a_k^c A_k)"
_LAYERCAM = "M_c(i, j) = ReLU(sum_k ReLU(dy_c/dA_k(i, j)) A_k(i, j)) (a weight per pixel)"
_SCORECAM = ("a_k^c = softmax_k(y_c(X * s(U(A_k)))), U: upsampling to the input, s: min-max to [0, 1]; "
             "M_c = ReLU(sum_k a_k^c A_k)")
_PAPERS = {
    "gradcam": "Selvaraju et al., \"Grad-CAM: Visual Explanations from Deep Networks via Gradient-based "
               "Localization\", ICCV 2017",
    "gradcam++": "Chattopadhay et al., \"Grad-CAM++: Improved Visual Explanations for Deep Convolutional "
                 "Networks\", WACV 2018",
    "xgradcam": "Fu et al., \"Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs\", "
                "BMVC 2020",
    "layercam": "Jiang et al., \"LayerCAM: Exploring Hierarchical Class Activation Maps for Localization\", "
                "IEEE TIP 2021",
    "scorecam": "Wang et al., \"Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural "
                "Networks\", CVPR Workshops 2020",
}

SPECS: Tuple[MethodSpec, ...] = (
    MethodSpec("gradcam", "pytorch-grad-cam", "GradCAM", _PAPERS["gradcam"], _GRADCAM),
    # The libraries read the paper's eq. 19 differently; their maps differ by a few points (methods.md).
    MethodSpec("gradcam++", "pytorch-grad-cam", "GradCAMPlusPlus", _PAPERS["gradcam++"],
               _GRADCAMPP.format("(sum_ab A_k(a, b)) g_k(i, j)^3")),
    MethodSpec("xgradcam", "pytorch-grad-cam", "XGradCAM", _PAPERS["xgradcam"], _XGRADCAM),
    MethodSpec("layercam", "pytorch-grad-cam", "LayerCAM", _PAPERS["layercam"], _LAYERCAM),
    MethodSpec("eigencam", "pytorch-grad-cam", "EigenCAM",
               "Muhammad & Yeasin, \"Eigen-CAM: Class Activation Map using Principal Components\", IJCNN 2020",
               "M = ReLU(A' v_1): A' = the (hw, K) activations centred per channel, v_1 its first right singular "
               "vector; one map for all classes", gradients=False, class_agnostic=True),
    # pytorch-grad-cam's hooks keep a CPU copy of the target layer's output for every masked batch until
    # the next call: image by image, that is K/batch_size copies, not N times as many.
    MethodSpec("scorecam", "pytorch-grad-cam", "ScoreCAM", _PAPERS["scorecam"], _SCORECAM, gradients=False,
               per_image=True, options=(("batch_size", 16),)),
    MethodSpec("torchcam:cam", "torchcam", "CAM",
               "Zhou et al., \"Learning Deep Features for Discriminative Localization\", CVPR 2016",
               "M_c = sum_k w_ck A_k with the 1x1 head's weights w (our class map without the bias b_c)",
               gradients=False),
    MethodSpec("torchcam:gradcam", "torchcam", "GradCAM", _PAPERS["gradcam"], _GRADCAM),
    MethodSpec("torchcam:gradcam++", "torchcam", "GradCAMpp", _PAPERS["gradcam++"],
               _GRADCAMPP.format("sum_ab A_k(a, b) g_k(a, b)^3")),
    MethodSpec("torchcam:smoothgradcam++", "torchcam", "SmoothGradCAMpp",
               "Omeiza et al., \"Smooth Grad-CAM++: An Enhanced Inference Level Visualization Technique for Deep "
               "Convolutional Neural Network Models\", arXiv:1908.01224, 2019",
               "torchcam's Grad-CAM++ with g^2, g^3 averaged over num_samples copies of the input plus "
               "N(0, std^2) noise "
               f"(seeded with {NOISE_SEED} on every call)", options=(("num_samples", 4), ("std", 0.3))),
    MethodSpec("torchcam:xgradcam", "torchcam", "XGradCAM", _PAPERS["xgradcam"], _XGRADCAM),
    MethodSpec("torchcam:layercam", "torchcam", "LayerCAM", _PAPERS["layercam"], _LAYERCAM),
    MethodSpec("torchcam:scorecam", "torchcam", "ScoreCAM", _PAPERS["scorecam"],
               _SCORECAM + " (torchcam subtracts y_c(X) inside the softmax, which does not change it)",
               gradients=False, per_image=True, options=(("batch_size", 32),)),
)


class LibraryMethod:
    """A method of pytorch-grad-cam or torchcam behind the map-method contract (module docstring).

    ``spec`` says which; ``target_layer`` names the module whose output ``A`` the method weighs
    (default ``"backbone"``); ``options`` are the method's own settings (``MethodSpec.options``, e.g.
    Score-CAM's ``batch_size``). The library is imported here, so a missing extra fails at once.
    """

    def __init__(self, spec: MethodSpec, model: nn.Module, *, target_layer: Optional[str] = None,
                 normalize: str = "max", channels_last: bool = True, **options: Any) -> None:
        self.spec, self.model = spec, model
        self.name, self.library, self.gradients = spec.name, spec.library, spec.gradients
        self.lib = import_library(spec.library, spec.name)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown CAM normalisation {normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")
        known = dict(spec.options)
        unknown = sorted(set(options) - set(known))
        if unknown:
            accepted = ", ".join(known) or "none"
            raise ValueError(f"CAM method {spec.name!r} has no option {unknown[0]!r} (its options: {accepted})")
        self.options = {**known, **options}
        self.target_layer = target_layer or DEFAULT_TARGET_LAYER
        modules = dict(model.named_modules())
        if self.target_layer not in modules or self.target_layer == "":
            near = [n for n in modules if n and n.split(".")[0] == self.target_layer.split(".")[0]][:8]
            hint = ", ".join(near or [n for n in modules if n and "." not in n])
            raise ValueError(f"target layer {self.target_layer!r} is not a module of {type(model).__name__}; "
                             f"name one of model.named_modules(), e.g. {hint}")
        self.layer = modules[self.target_layer]
        if spec.library == "torchcam":
            for attr in ("stride", "offset"):
                if not hasattr(model, attr):
                    raise ValueError(f"model {type(model).__name__} has no {attr!r}, which upsampling torchcam's "
                                     "maps needs (a wsl classifier: docs/design.md)")
        if spec.cls == "CAM":
            head = modules.get("head")
            if not isinstance(head, nn.Conv2d) or getattr(getattr(model, "config", None), "maps_per_class", 1) != 1:
                raise ValueError(f"{spec.name!r} reads the weights of a 1x1 conv 'head' with one map per class; "
                                 "use 'cam' for this model")
        self.normalize, self.channels_last = normalize, bool(channels_last)

    def describe(self) -> str:
        opts = "".join(f", {k} {v}" for k, v in self.options.items())
        return f"{self.name} ({self.library} {self.spec.cls}, target layer {self.target_layer}{opts})"

    # --- one call --------------------------------------------------------------------------------
    def __call__(self, images: Tensor, select: Optional[Tensor] = None) -> CAMOutput:
        _check_images(images)
        device = _model_device(self.model)
        with torch.inference_mode(False):
            x = images.to(device).clone()  # a normal tensor, also when the caller is in inference mode
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            n, _, H, W = x.shape
            xp = _pad_to_minimum(self.model, x)
            with torch.no_grad():
                scores = self.model(xp).float()
            if scores.dim() != 2 or scores.shape[0] != n:
                raise ValueError(f"model output has shape {tuple(scores.shape)}, expected image scores (N, C)")
            c = scores.shape[1]
            select = _check_select(select, n, c)
            if select is None:
                select = select_classes(scores=scores).cpu()
            cams = torch.zeros((n, c, H, W), dtype=torch.float32, device=device)
            if select.any():
                groups = [[i] for i in range(n)] if self.spec.per_image else [list(range(n))]
                for idx in groups:
                    sub = select[idx]
                    if not sub.any():
                        continue
                    with hooks_removed(self.model):
                        self._compute(xp[idx], (H, W), sub, cams[idx[0]:idx[-1] + 1])
            return CAMOutput(cams=normalize_cams(cams, self.normalize, inplace=True), scores=scores)

    def _compute(self, x: Tensor, size: Tuple[int, int], select: Tensor, out: Tensor) -> None:
        """Fill ``out`` (n, C, H, W) with the maps of ``select`` for the (padded) batch ``x``."""
        rounds = class_rounds(select)
        if self.spec.class_agnostic:
            rounds = rounds[:1]
        run = self._pytorch_grad_cam if self.library == "pytorch-grad-cam" else self._torchcam
        for r, maps in enumerate(run(x, rounds)):
            maps = maps[:, : size[0], : size[1]] if maps.shape[-2:] != size else maps
            for i, k in enumerate(rounds[r]):
                targets = torch.nonzero(select[i]).flatten().tolist() if self.spec.class_agnostic else [k]
                for t in targets:
                    if select[i, t]:
                        out[i, t] = maps[i]

    def _pytorch_grad_cam(self, x: Tensor, rounds: List[List[int]]) -> Iterator[Tensor]:
        """Maps at input size, one (n, H, W) per round: the library's forward, backward and resize."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        tool = getattr(self.lib, self.spec.cls)(model=self.model, target_layers=[self.layer])
        try:
            if "batch_size" in self.options:
                tool.batch_size = int(self.options["batch_size"])
            with self._quiet(), torch.set_grad_enabled(self.gradients):
                for classes in rounds:
                    maps = tool(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in classes])
                    yield torch.from_numpy(np.asarray(maps, dtype=np.float32)).to(x.device)
        finally:
            tool.activations_and_grads.release()

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """pytorch-grad-cam's Score-CAM shows a tqdm bar per image; library code must not print."""
        module = importlib.import_module("pytorch_grad_cam.score_cam") if self.spec.cls == "ScoreCAM" else None
        if module is None:
            yield
            return
        real = module.tqdm
        module.tqdm = types.SimpleNamespace(tqdm=functools.partial(real.tqdm, disable=True))
        try:
            yield
        finally:
            module.tqdm = real

    def _torchcam(self, x: Tensor, rounds: List[List[int]]) -> Iterator[Tensor]:
        """Maps at the target layer's resolution (``normalized=False``), upsampled with the network
        geometry to input size; one (n, H, W) per round."""
        cls = getattr(self.lib, self.spec.cls)
        kwargs: Dict[str, Any] = dict(self.options)
        if self.spec.cls == "CAM":
            kwargs["fc_layer"] = "head"
        tool = cls(self.model, target_layer=self.target_layer, input_shape=tuple(x.shape[1:]), **kwargs)
        size = tuple(x.shape[-2:])
        try:
            cuda = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
                if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda), torch.set_grad_enabled(self.gradients):
                torch.manual_seed(NOISE_SEED)  # the input noise of Smooth Grad-CAM++: the same on every call
                scores = self.model(x)
                for r, classes in enumerate(rounds):
                    if self.spec.cls in ("CAM", "ScoreCAM", "SmoothGradCAMpp"):
                        low = tool(class_idx=classes, normalized=False)[0]
                    else:  # the gradient of the scores computed above, once per round
                        low = tool(class_idx=classes, scores=scores, normalized=False,
                                   retain_graph=r + 1 < len(rounds))[0]
                    yield upsample_cams(low.detach().float()[:, None], size, stride=self.model.stride,
                                        offset=self.model.offset)[:, 0]
        finally:
            tool.remove_hooks()
            tool.reset_hooks()


def _register(spec: MethodSpec) -> None:
    def build(*, model: nn.Module, target_layer: Optional[str] = None, normalize: str = "max",
              channels_last: bool = True, **options: Any) -> LibraryMethod:
        return LibraryMethod(spec, model, target_layer=target_layer, normalize=normalize,
                             channels_last=channels_last, **options)

    opts = ", ".join(f"{k}={v!r}" for k, v in spec.options) or "none"
    build.__doc__ = (f"``{spec.name}``: {spec.paper}.\n\n    {spec.formula}\n\n    Through {spec.library}'s "
                     f"``{spec.cls}``; options: {opts}.")
    build.__name__ = f"build_{spec.name.replace(':', '_').replace('+', 'p')}"
    CAM_METHODS.register(spec.name)(build)


for _spec in SPECS:
    _register(_spec)


def method_library(name: str) -> str:
    """``wsl``, ``pytorch-grad-cam`` or ``torchcam``: who computes method ``name``."""
    CAM_METHODS.get(name)
    return next((s.library for s in SPECS if s.name == name), "wsl")


def build_cam_method(name: str, model: nn.Module, *, scales: Sequence[float] = (1.0,), flip: bool = False,
                     normalize: str = "max", target_layer: Optional[str] = None, channels_last: bool = True,
                     **options: Any) -> Callable[..., CAMOutput]:
    """The map method ``name`` of :data:`CAM_METHODS` for ``model`` (contract: module docstring).

    ``scales`` and ``flip`` (multi-scale and mirrored averaging) belong to ``cam``, ``target_layer`` and
    ``options`` to the library methods; giving one to a method that has no use for it is refused, so a
    setting is never silently ignored.
    """
    CAM_METHODS.get(name)  # unknown names raise with the list
    if name == DEFAULT_METHOD:
        if target_layer is not None or options:
            given = "target_layer" if target_layer is not None else sorted(options)[0]
            raise ValueError(f"CAM method 'cam' reads the model's own class maps: {given} does not apply to it "
                             "(it is for the pytorch-grad-cam / torchcam methods)")
        return CAM_METHODS.build(name, model=model, scales=scales, flip=flip, normalize=normalize,
                                 channels_last=channels_last)
    if tuple(float(s) for s in scales) != (1.0,) or flip:
        raise ValueError(f"--scales / --flip average our class maps over scales and mirror images: they apply to "
                         f"--method cam only, not {name!r}")
    return CAM_METHODS.build(name, model=model, target_layer=target_layer, normalize=normalize,
                             channels_last=channels_last, **options)


__all__ = ["CAM_METHODS", "DEFAULT_METHOD", "DEFAULT_TARGET_LAYER", "EXTRA", "LibraryMethod", "MethodSpec", "OwnCAM",
           "SPECS", "build_cam_method", "class_rounds", "count_hooks", "hooks_removed", "import_library",
           "method_library"]
