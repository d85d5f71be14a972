"""The files of a ``wsl cam`` export, named and written in one place (read back by ``wsl bench``).

``ID.npz`` (docs/design.md, "CAM files") comes in two layouts, both read by :func:`load_cam_npz`:

- ``wsl-cams/1``, every map at image resolution (what any tool writes, and ``wsl cam --full-maps``):
  ``cams`` float16 ``(C, H, W)``, higher = more of the class; ``classes`` str ``(C,)``; ``scores``
  float32 ``(C,)`` image-level class scores (optional for other tools).
- ``wsl-cams/2``, what ``wsl cam`` writes by default: the used classes' maps at image resolution and
  every class's map as the network computed it (a few cells each), from which the others are
  upsampled when read: ``format`` = ``"wsl-cams/2"``; ``classes``; ``scores``; ``used_cams`` float16
  ``(K, H, W)``, the normalised maps of the classes ``used_classes`` int32 ``(K,)`` (indices into
  ``classes``, ascending); ``pass_maps_P`` float16 ``(F, C, h, w)`` per forward pass ``P`` (scale), the
  raw class maps (``F = 2`` with flip: the mirrored image second); ``geometry`` str, JSON of what
  :class:`wsl.cam.extract.ClassMaps` needs to upsample them (``image_size``, ``input_sizes``,
  ``stride``, ``offset``, ``flip``, ``normalize``). Without pass maps (the library CAM methods, which
  compute only the used classes) the other classes' maps are zero. A 1000-class file at 448 px holds
  0.38 MiB instead of 106 MiB (experiments/results/speed.md, row 1f).

``ID`` is the image id with ``/`` and ``\\`` replaced by ``__`` (:func:`file_stem`), so ids with folders
name flat files.

Every writer here is atomic (``wsl.utils.io.atomic_path``): an interrupted export never leaves a
truncated file under its final name. Files are also byte-for-byte reproducible: the same arrays give
the same bytes on every run (``np.savez_compressed`` would stamp each member with the current time),
which is what lets ``wsl cam --resume`` finish an export exactly as an uninterrupted run would.
:func:`open_output_dir` prepares the output folder: fresh, or for a resume checked against its
``options.json`` and cleared of the temporaries a kill left behind.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from wsl.data.classes import VOC_PALETTE
from wsl.errors import DataError
from wsl.utils.io import (OUTPUT_MARKER, PathLike, atomic_write_bytes, atomic_write_json, prepare_output_dir,
                          remove_temporaries)

logger = logging.getLogger(__name__)

OPTIONS_FILE = "options.json"
IMAGE_DIRS = ("cams", "overlays", "masks", "records")  # per-image outputs; an image's record is written last
# A fixed member timestamp (the zip epoch, as reproducible-build tools use) instead of "now".
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def file_stem(image_id: str) -> str:
    """File name (without extension) for an image id: path separators become ``__``."""
    stem = str(image_id).replace("/", "__").replace("\\", "__")
    if stem in ("", ".", ".."):
        raise DataError(f"image id {image_id!r} cannot name a file")
    return stem


def npz_bytes(arrays: dict, stored: Sequence[str] = ()) -> bytes:
    """The bytes of ``np.savez_compressed(arrays)`` with fixed member timestamps: an ``.npz`` that
    ``np.load`` reads like any other and whose bytes depend only on ``arrays``. Members named in
    ``stored`` are not compressed (as ``np.savez`` writes them)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:  # force_zip64 as numpy does (gh-10776)
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def write_npz(path: PathLike, arrays: dict) -> None:
    """:func:`npz_bytes` written atomically to ``path``."""
    atomic_write_bytes(path, npz_bytes(arrays))


def cam_npz_bytes(cams: np.ndarray, classes: Sequence[str], scores: np.ndarray) -> bytes:
    """The bytes of one ``wsl-cams/1`` ``ID.npz`` (module docstring); values beyond float16's range are
    clipped."""
    return npz_bytes({"cams": _f16(cams),
                      "classes": np.asarray(list(classes), dtype=str),
                      "scores": np.asarray(scores, dtype=np.float32)})


def save_cam_npz(path: PathLike, cams: np.ndarray, classes: Sequence[str], scores: np.ndarray) -> None:
    """Write one ``wsl-cams/1`` ``ID.npz`` (module docstring), atomically."""
    atomic_write_bytes(path, cam_npz_bytes(cams, classes, scores))


FULL_FORMAT = "wsl-cams/1"
PACKED_FORMAT = "wsl-cams/2"


def _f16(a: np.ndarray) -> np.ndarray:
    finfo = np.finfo(np.float16)  # values beyond float16's range are clipped, not made infinite
    return np.clip(a, finfo.min, finfo.max).astype(np.float16)


def packed_cam_npz_bytes(used_cams: np.ndarray, used_classes: Sequence[int], classes: Sequence[str],
                         scores: np.ndarray, passes: Optional[Sequence[np.ndarray]] = None,
                         geometry: Optional[Dict[str, Any]] = None) -> bytes:
    """The bytes of one ``wsl-cams/2`` ``ID.npz`` (module docstring): ``used_cams`` ``(K, H, W)`` of
    the classes ``used_classes``; ``passes`` (each ``(F, C, h, w)``) and ``geometry`` from
    :meth:`wsl.cam.extract.ClassMaps.image_passes` / :meth:`~wsl.cam.extract.ClassMaps.geometry`."""
    if (passes is None) != (geometry is None):
        raise ValueError("packed_cam_npz_bytes: passes and geometry go together")
    arrays: Dict[str, Any] = {"format": np.asarray(PACKED_FORMAT), "classes": np.asarray(list(classes), dtype=str),
                              "scores": np.asarray(scores, dtype=np.float32), "used_cams": _f16(used_cams),
                              "used_classes": np.asarray(used_classes, dtype=np.int32).reshape(-1)}
    if passes is not None:
        arrays.update({f"pass_maps_{p}": _f16(m) for p, m in enumerate(passes)})
        arrays["geometry"] = np.asarray(json.dumps(geometry, sort_keys=True))
    # Raw class maps barely deflate (~10% at 1000 classes) for most of the file's writing time: stored.
    return npz_bytes(arrays, stored=[k for k in arrays if k.startswith("pass_maps_")])


class CamMaps:
    """Every class's map of one ``wsl-cams/2`` file (module docstring), float32 ``(H, W)`` each, decoded
    when asked for: a used class's stored map as it is, another class's upsampled from the pass maps
    by the exporter's own :meth:`wsl.cam.extract.ClassMaps.upsample` (zero without pass maps).

    Reads like a read-only float32 ``(C, H, W)`` array where ``wsl bench`` reads one: ``shape``,
    ``len``, ``maps[c]`` (one map), ``maps[indices]`` / ``maps[bool mask]`` ``(k, H, W)``, and
    ``np.asarray(maps)`` (all of them: ``C * H * W * 4`` bytes, 191 MiB for 1000 classes at 224 px).
    The benchmark asks only for the classes its metrics score, so an ImageNet file costs one or two
    upsampled maps instead of 1000. ``where`` names the file in errors."""

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, where: str, used: np.ndarray, used_classes: np.ndarray, num_classes: int,
                 size: Tuple[int, int], class_maps: Any = None) -> None:
        self.where, self._used, self._maps = where, used, class_maps
        self._slot = np.full(num_classes, -1, np.int64)  # class -> its row of used (-1: upsampled)
        self._slot[used_classes] = np.arange(len(used_classes))
        self._order = np.arange(num_classes)  # the file's class of each position (reorder)
        self.shape = (int(num_classes), int(size[0]), int(size[1]))

    @classmethod
    def from_class_maps(cls, maps: Any, where: str = "class maps") -> "CamMaps":
        """The maps of one image's :class:`wsl.cam.extract.ClassMaps` (``ClassMaps.image(i)``), every class
        upsampled when read, as a ``wsl-cams/2`` file of it gives them (``wsl bench --checkpoint``)."""
        h, w = maps.image_size
        return cls(where, np.zeros((0, h, w), np.float32), np.zeros(0, np.int64), maps.scores.shape[1], (h, w), maps)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        picked = np.arange(len(self))[key]  # numpy's rules for ints, slices, index and bool arrays
        return self.take(picked.reshape(-1))[0] if np.ndim(picked) == 0 else self.take(picked)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.take(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def take(self, positions: Sequence[int]) -> np.ndarray:
        """The maps at ``positions`` (int indices), float32 ``(k, H, W)``, a new array."""
        cls = self._order[np.asarray(positions, dtype=np.int64)]
        slot = self._slot[cls]
        out = np.zeros((len(cls), *self.shape[1:]), np.float32)
        stored = slot >= 0
        out[stored] = self._used[slot[stored]]
        rest = np.flatnonzero(~stored)
        if len(rest) and self._maps is not None:
            try:
                out[rest] = self._maps.upsample(torch.from_numpy(cls[rest])).cpu().numpy()
            except (TypeError, ValueError, RuntimeError) as e:
                raise DataError(f"{self.where}: its pass maps and geometry do not give {len(self)} class maps of "
                                f"{self.shape[1]}x{self.shape[2]} ({e})") from e
        return out

    def reorder(self, perm: np.ndarray) -> "CamMaps":
        """The same maps with position ``i`` holding this one's ``perm[i]`` (``cams[perm]`` without decoding)."""
        other = copy.copy(self)
        other._order = self._order[np.asarray(perm, dtype=np.int64)]
        return other

    def all_finite(self) -> bool:
        """Whether the stored values are finite (the stored maps, and the pass maps the others come from)."""
        passes = [] if self._maps is None else [m for m, _ in self._maps.passes]
        return bool(np.isfinite(self._used).all()) and all(bool(torch.isfinite(m).all()) for m in passes)


def _unpack(z: Any, path: Any, classes: List[str]) -> CamMaps:
    """The :class:`CamMaps` of an open ``wsl-cams/2`` file, its arrays checked and decoded (the maps of
    the classes other than the used ones are upsampled when read)."""
    from wsl.cam.extract import ClassMaps  # torch; only this layout needs it

    used = z["used_cams"]
    idx = np.asarray(z["used_classes"], dtype=np.int64).reshape(-1)
    c = len(classes)
    if used.ndim != 3 or len(used) != len(idx) or (idx.size and (idx.min() < 0 or idx.max() >= c)) \
            or len(np.unique(idx)) != len(idx):
        raise DataError(f"{path}: used_cams {tuple(used.shape)} and used_classes {idx.tolist()[:8]} do not match: "
                        f"one (H, W) map per used class, each an index into its {c} classes once")
    geometry = json.loads(str(z["geometry"])) if "geometry" in z.files else None
    size = used.shape[1:] if len(idx) or geometry is None else tuple(geometry["image_size"])
    maps = None
    if geometry is not None and len(idx) < c:
        try:
            flip = bool(geometry["flip"])
            passes = [(torch.from_numpy(z[f"pass_maps_{p}"].astype(np.float32)), tuple(s))
                      for p, s in enumerate(geometry["input_sizes"])]
            if not passes or any(m.dim() != 4 or tuple(m.shape[:2]) != (2 if flip else 1, c) for m, _ in passes):
                raise ValueError(f"pass maps must be ({2 if flip else 1}, {c}, h, w), got "
                                 f"{[tuple(m.shape) for m, _ in passes]}")
            maps = ClassMaps(passes=passes, scores=torch.zeros(1, c), image_size=tuple(size),
                             stride=geometry["stride"], offset=geometry["offset"], flip=flip,
                             normalize=geometry["normalize"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: its pass maps and geometry do not give {c} class maps of {size[0]}x{size[1]} "
                            f"({e}); write the file with wsl.cam.files.packed_cam_npz_bytes") from e
    return CamMaps(str(path), used, idx, c, tuple(size), maps)


@contextlib.contextmanager
def _cam_npz(path: PathLike, data: Optional[bytes], needed: Callable[[List[str]], Sequence[str]]) -> Iterator[Any]:
    """The open CAM file (or its bytes ``data``) holding the members ``needed(members)``; every read error,
    also one in the caller's block, becomes one ``DataError`` naming ``path``."""
    try:
        with np.load(path if data is None else io.BytesIO(data), allow_pickle=False) as z:
            missing = sorted(set(needed(z.files)) - set(z.files))
            if missing:
                raise DataError(f"{path}: no {', '.join(missing)} array; a CAM file holds cams (C, H, W), "
                                "classes (C,) and scores (C,)")
            yield z
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: unreadable .npz ({e}); save with np.savez_compressed and a str "
                        "array of class names") from e


def load_cam_npz(path: PathLike, data: Optional[bytes] = None, *, lazy: bool = False
                 ) -> Tuple[Any, List[str], Optional[np.ndarray]]:
    """``(cams (C, H, W), classes, scores or None)`` of a CAM file of either layout (module docstring),
    or of its bytes ``data`` (e.g. a shard member that ``path`` names); errors name the file and what
    it must hold. ``cams`` is a float32 array for ``wsl-cams/2`` (every class upsampled), the stored
    array for ``wsl-cams/1``; with ``lazy=True`` a ``wsl-cams/2`` file gives a :class:`CamMaps`
    instead, which decodes a class's map when it is read."""
    def needed(members: List[str]) -> Sequence[str]:
        return ("used_cams", "used_classes", "classes") if "used_cams" in members else ("cams", "classes")

    with _cam_npz(path, data, needed) as z:
        classes = [str(c) for c in z["classes"].tolist()]
        scores = z["scores"] if "scores" in z.files else None
        cams = _unpack(z, path, classes) if "used_cams" in z.files else z["cams"]
    return (cams if lazy or not isinstance(cams, CamMaps) else np.asarray(cams)), classes, scores


def cam_npz_classes(path: PathLike, data: Optional[bytes] = None) -> List[str]:
    """The class names of a CAM file of either layout, without decoding its maps."""
    with _cam_npz(path, data, lambda members: ("classes",)) as z:
        return [str(c) for c in z["classes"].tolist()]


def palette_png_bytes(mask: np.ndarray) -> bytes:
    """A uint8 class-index mask as the bytes of a VOC palette PNG."""
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(VOC_PALETTE.flatten().tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def save_palette_png(path: PathLike, mask: np.ndarray) -> None:
    """Write a uint8 class-index mask as a VOC palette PNG, atomically."""
    atomic_write_bytes(path, palette_png_bytes(mask))


def rgb_png_bytes(rgb: np.ndarray) -> bytes:
    """A uint8 RGB image as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def save_rgb_png(path: PathLike, rgb: np.ndarray) -> None:
    """Write a uint8 RGB image as PNG, atomically."""
    atomic_write_bytes(path, rgb_png_bytes(rgb))


def mask_from_png_bytes(data: bytes, where: str) -> np.ndarray:
    """A class-index mask PNG's bytes (e.g. a shard member, named ``where`` in errors) as (H, W) uint8,
    with the checks of :func:`wsl.data.base.read_mask_png`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:
                raise DataError(f"{where}: {im.width}x{im.height} pixels is over the {limit:,} pixel limit")
            im.load()
            if im.mode not in ("P", "L"):
                raise DataError(f"{where}: mask must be a palette ('P') or grayscale ('L') PNG of class indices, "
                                f"found mode {im.mode!r}")
            return np.asarray(im, dtype=np.uint8).copy()
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: unreadable mask PNG ({e})") from e


def json_bytes(obj: Any) -> bytes:
    """``obj`` as :func:`wsl.utils.io.atomic_write_json` writes it (indented, final newline)."""
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")


def open_output_dir(out_dir: PathLike, run_info: Dict[str, Any], *, overwrite: bool = False,
                    resume: bool = False, inputs: Sequence[Any] = (), kind: str = "cam",
                    dirs: Sequence[str] = IMAGE_DIRS) -> Path:
    """A fresh output directory (``prepare_output_dir``) with ``run_info`` in ``options.json``, or
    with ``resume`` an unfinished one whose ``options.json`` equals ``run_info``, cleared of the
    temporary files that interrupted atomic writes leave (``wsl.utils.io.atomic_path`` names them
    ``.NAME.XXXX.tmpEXT``). ``inputs``: what the export reads, never removed by ``overwrite``.
    Creates the per-image folders ``dirs``. ``kind``: the command (``cam``, ``segment``) whose output
    it is."""
    out = Path(out_dir)
    if resume and out.is_dir() and any(p.name != OUTPUT_MARKER for p in out.iterdir()):
        path = out / OPTIONS_FILE
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{out}: no {OPTIONS_FILE}, so it is not a `wsl {kind}` output that can be resumed; "
                            "choose another --out, or pass --overwrite instead of --resume") from None
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e}); pass --overwrite instead of --resume") from e
        diff = _first_difference(previous, run_info)
        if diff:
            raise DataError(f"{path}: the export in {out} was made with {diff}; resume with the same "
                            "settings, or pass --overwrite instead of --resume to start again")
        left = remove_temporaries([out, *(out / d for d in dirs)])
        if left:
            logger.info("removed %d temporary file(s) of interrupted writes in %s", left, out)
    else:
        # resume of a run killed between its marker and options.json: nothing of it to keep
        started = resume and out.is_dir() and [p.name for p in out.iterdir()] == [OUTPUT_MARKER]
        out = prepare_output_dir(out_dir, overwrite or started, kind=kind, inputs=inputs)
        atomic_write_json(out / OPTIONS_FILE, run_info)
    for d in dirs:
        (out / d).mkdir(exist_ok=True)
    return out


def _first_difference(previous: Any, current: Any, key: str = "") -> Optional[str]:
    """``"KEY=old (this run: new)"`` for the first differing entry of two JSON values, else None."""
    if isinstance(previous, dict) and isinstance(current, dict):
        for k in list(previous) + [k for k in current if k not in previous]:
            found = _first_difference(previous.get(k), current.get(k), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    return None if previous == current else f"{key}={previous!r} (this run: {current!r})"
