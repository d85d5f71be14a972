"""Files that are never half-written, checkpoints that never run code, images that fail with a name.

Every write goes to a temporary file in the same directory and is moved into place with ``os.replace``,
which is atomic on POSIX: a reader (or a resumed run after SIGKILL) sees the old file or the new one,
never a truncated one.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from wsl.errors import CheckpointError, DataError, OutputExistsError

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``, on error delete it.

    The temporary name keeps the suffix so libraries that pick a format from it (PIL, matplotlib,
    numpy) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # fsync so a power cut cannot leave the renamed file empty.
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        if e.errno is not None and (e.filename is None or str(e.filename) == str(tmp_path)):
            # name the result the user asked for, not its temporary
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def is_atomic_temporary(name: str) -> bool:
    """Whether a file name is that of an :func:`atomic_path` temporary (``.STEM.XXXXXXXX.tmpSUFFIX``)."""
    return name.startswith(".") and ".tmp" in name


def remove_temporaries(folders: Iterable[PathLike], *, recursive: bool = False) -> int:
    """Delete the temporaries that :func:`atomic_path` writes left when their process was killed
    (``.NAME.XXXXXXXX.tmpEXT``) in ``folders`` (and their subfolders with ``recursive``); returns how
    many. For resuming into an output folder: a kill between the temporary's creation and its rename
    leaves one behind, which nothing else would remove."""
    removed = 0
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for p in (folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*")):
            if p.is_file() and is_atomic_temporary(p.name):
                p.unlink()
                removed += 1
    return removed


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line. A crash can lose the line being written but never corrupts earlier ones;
    readers skip a torn last line (see :func:`read_jsonl`)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: PathLike) -> list:
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # torn final line after a kill
    return records


def save_checkpoint(path: PathLike, payload: Mapping[str, Any]) -> None:
    """Save a checkpoint atomically. ``payload`` must hold only tensors, numbers, strings, lists and
    dicts so that :func:`load_checkpoint` can read it with ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save(dict(payload), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: a pickle that would execute code is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: {_unsafe_reason(e)}; use a checkpoint written by wsl, "
                              "or re-save the state dict from code you trust") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        # torch's first sentence says what failed; the rest is its generic advice (and miniz internals)
        first = str(e).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first}): the file is truncated or "
                              "corrupt; copy it again or use another checkpoint") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


#: The file :func:`prepare_output_dir` writes first into every output directory: which ``wsl`` command
#: owns it. ``--overwrite`` empties only a directory that holds this file naming the same command.
OUTPUT_MARKER = "wsl-output.json"


def _unsafe_reason(error: BaseException) -> str:
    """What torch's weights-only unpickler refused, without its advice to retry with
    ``weights_only=False`` (which would run the file's code)."""
    for line in str(error).splitlines():
        line = line.strip()
        if "GLOBAL" in line or line.lower().startswith(("unsupported", "weightsunpickler error")):
            # keep only what was refused ("GLOBAL posix.system"), not torch's sentence around it
            what = line.split("GLOBAL", 1)[1].split(" whose ")[0].strip() if "GLOBAL" in line else line.rstrip(".")
            return f"it holds Python objects that would run code when loaded ({what})"
    return "it is not a plain weights file"


def prepare_output_dir(path: PathLike, overwrite: bool = False, *, kind: str = "output",
                       inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """Create ``path`` for fresh results of the command ``kind`` (``"cam"``, ``"train"``, ...) and write
    :data:`OUTPUT_MARKER` into it.

    An existing non-empty directory is an error unless ``overwrite``; then its contents are removed,
    but only when it is this command's own earlier output: it must hold the marker naming ``kind``, and
    none of ``inputs`` (the files and folders the command reads: dataset, checkpoint, masks, CAMs) may
    be the directory or lie inside it. Anything else raises :class:`OutputExistsError` and nothing is
    removed. What was removed is logged.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output path exists and is not a directory: {path}")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"output directory is not empty: {path} (pass --overwrite to replace it)")
        check_replaceable(path, kind=kind, inputs=inputs)
        files = dirs = 0
        for entry in list(path.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                files += sum(1 for q in entry.rglob("*") if not q.is_dir())
                dirs += 1
                shutil.rmtree(entry)
            else:
                files += 1
                entry.unlink()
        log.info("--overwrite: removed %d file(s) in %d folder(s) and the top level of the previous `wsl %s` "
                 "output %s", files, dirs, kind, path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / OUTPUT_MARKER, {"format": "wsl-output/1", "command": kind})
    return path


def existing_paths(*values: Any) -> list:
    """The values that name an existing file or folder (weights may be a path or an enum name)."""
    return [Path(v).expanduser() for v in values
            if isinstance(v, (str, os.PathLike)) and str(v) and Path(v).expanduser().exists()]


def check_replaceable(path: PathLike, *, kind: str, inputs: Iterable[Optional[PathLike]] = ()) -> None:
    """Raise :class:`OutputExistsError` unless ``--overwrite`` may empty the directory ``path``
    (:func:`prepare_output_dir`): it holds none of ``inputs`` and is an earlier ``wsl kind`` output."""
    path = Path(path)
    out = path.resolve()
    for item in inputs:
        if item is None or str(item) == "":
            continue
        p = Path(item).expanduser().resolve()
        if p == out or out in p.parents:
            raise OutputExistsError(f"refusing --overwrite: {path} holds this command's input {item}; "
                                    "choose another --out")
    marker = path / OUTPUT_MARKER
    try:
        owner = json.loads(marker.read_text(encoding="utf-8")).get("command")
    except FileNotFoundError:
        raise OutputExistsError(f"refusing --overwrite: {path} is not a `wsl {kind}` output (no {OUTPUT_MARKER}); "
                                "choose another --out, or empty it yourself") from None
    except (OSError, ValueError, AttributeError) as e:
        raise OutputExistsError(f"refusing --overwrite: {marker} is unreadable ({e}); choose another --out, "
                                "or empty it yourself") from e
    if owner != kind:
        raise OutputExistsError(f"refusing --overwrite: {path} holds a `wsl {owner}` output, not a `wsl {kind}` "
                                "one; choose another --out")


# Over Image.MAX_IMAGE_PIXELS PIL only warns (it refuses at twice that); the reader below refuses at the
# limit itself with a message naming the file, so PIL's warning would only add a stray stderr line.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

#: EXIF orientations (tag 0x0112) that turn the stored image by 90 degrees: width and height swap.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


@contextlib.contextmanager
def open_image(path: PathLike) -> Iterator[Image.Image]:
    """``Image.open`` behind every guard: missing / empty / looping files, non-images, and images over
    ``PIL.Image.MAX_IMAGE_PIXELS`` (a guard against decompression bombs and out-of-memory decoding)
    raise one error naming the file, before any pixel is decoded."""
    path = Path(path)
    if not path.is_file():
        if os.path.islink(path):
            raise DataError(f"{path}: broken or looping symbolic link; remove it or point it at an image")
        raise FileNotFoundError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty image file (0 bytes)")
    try:
        with Image.open(path) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:
                raise DataError(f"{path}: {im.width}x{im.height} = {im.width * im.height:,} pixels is over the "
                                f"{limit:,} pixel limit (PIL.Image.MAX_IMAGE_PIXELS, against decompression bombs "
                                "and out-of-memory); resize the image, or raise the limit if the file is trusted")
            yield im
    except DataError:
        raise
    except UnidentifiedImageError as e:
        raise DataError(f"{path}: not an image file PIL can read") from e
    except Image.DecompressionBombError as e:  # not an OSError
        raise DataError(f"{path}: {e} (resize the image, or raise PIL.Image.MAX_IMAGE_PIXELS if the file is "
                        "trusted)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from e


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block is no reason to refuse the pixels
        return 1


def image_size(path: PathLike, *, exif: bool = True) -> Tuple[int, int]:
    """``(H, W)`` of an image from its header (no decoding), as :func:`read_image` returns it: after
    the EXIF orientation when ``exif``. Errors as :func:`read_image`."""
    with open_image(path) as im:
        if exif and _orientation(im) in _TRANSPOSING_ORIENTATIONS:
            return im.width, im.height
        return im.height, im.width


def read_image(path: PathLike, *, exif: bool = True) -> np.ndarray:
    """Read an image file as an RGB uint8 array (H, W, 3): the one guarded reader every image goes
    through.

    Handles grayscale, palette, alpha (dropped), CMYK and 16-bit images; with ``exif`` the EXIF
    orientation is applied (a phone photo comes out upright, as viewers show it). A missing, looping,
    truncated, empty or non-image file, or one over ``PIL.Image.MAX_IMAGE_PIXELS``, raises an error that
    names the file.
    """
    with open_image(path) as im:  # its guards also name the file when decoding fails
        im.load()  # decode now so truncation surfaces here, not in a worker later
        if exif and _orientation(im) != 1:
            im = ImageOps.exif_transpose(im)
        return _to_rgb_array(im)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits by the type's range rather than clipping.
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr8[..., None], 3, axis=2)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        arr8 = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(arr8[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA").convert("RGB")  # drop alpha: the colour channels keep the content
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
