"""`wsl cam` export: file formats, datasets and image folders, overwrite policy, atomic writes, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsl.cam.crf import DenseCRF, crf_pseudo_masks
from wsl.cam.export import ExportOptions, export_cams, imagenet_normalizer, localize
from wsl.data.images import ImageFolderDataset
from wsl.cam.extract import CAMExtractor, select_classes
from wsl.cam.files import load_cam_npz
from wsl.cam.postprocess import argmax_points, cam_boxes, local_maxima, pseudo_masks
from wsl.cli import main as cli_main
from wsl.data.spec import build_dataset
from wsl.errors import DataError, OutputExistsError
from wsl.models import build_classifier, classifier_checkpoint
from wsl.utils.io import save_checkpoint


def _model(num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_classifier(backbone="vgg_tiny", num_classes=num_classes, pooling="lse")


@pytest.fixture()
def val_set(scenes_root):
    return build_dataset(f"voc:{scenes_root}", "val")


@pytest.fixture()
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (40, 48), "b": (40, 48), "c": (36, 30)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{name}.png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_export_dataset_writes_every_file_in_its_format(val_set, tmp_path):
    classes = val_set.classes
    model = _model(len(classes)).eval()
    out = tmp_path / "cams_out"
    manifest = export_cams(model, classes, val_set, out, batch_size=3, scales=(1.0, 0.75), flip=True,
                           progress=False)
    n = len(val_set)
    assert manifest["counts"]["images"] == n and manifest["options"]["classes_from"] == "labels"
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == ["boxes_coco.json", "cams", "localization.json",
                                                     "manifest.json", "masks", "options.json", "overlays",
                                                     "records", "wsl-output.json"]
    assert json.loads((out / "options.json").read_text())["options"] == manifest["options"]
    ext = CAMExtractor(model, scales=(1.0, 0.75), flip=True)
    assert manifest["format"] == "wsl-cams/2" and set(manifest["npz"]) >= {"used_cams", "pass_maps_P"}
    for i, ann in enumerate(val_set.annotations):
        with np.load(out / "cams" / f"{ann.id}.npz", allow_pickle=False) as z:
            assert sorted(z.files) == ["classes", "format", "geometry", "pass_maps_0", "pass_maps_1", "scores",
                                       "used_cams", "used_classes"]
            used, which, names = z["used_cams"], z["used_classes"], z["classes"].tolist()
            assert str(z["format"]) == "wsl-cams/2" and z["pass_maps_0"].shape[:2] == (2, len(classes))  # flip
        cams, _, scores = load_cam_npz(out / "cams" / f"{ann.id}.npz")  # every class, the others upsampled
        image = val_set[i]["image"]
        assert which.tolist() == np.flatnonzero(ann.labels).tolist() and used.dtype == np.float16
        assert cams.shape == (len(classes),) + tuple(image.shape[1:]) and np.array_equal(cams[which], used)
        assert names == classes and scores.dtype == np.float32 and scores.shape == (len(classes),)
        ref = ext(imagenet_normalizer(image[None]))
        np.testing.assert_allclose(cams, ref.cams[0].numpy(), atol=2e-3)
        np.testing.assert_allclose(scores, ref.scores[0].numpy(), rtol=1e-4, atol=1e-4)
        with Image.open(out / "masks" / f"{ann.id}.png") as im:
            assert im.mode == "P" and im.size == (image.shape[2], image.shape[1])
            values = set(np.unique(np.asarray(im)).tolist())
        assert values <= {0, 255} | {int(c) + 1 for c in np.flatnonzero(ann.labels)}
        with Image.open(out / "overlays" / f"{ann.id}.png") as im:
            assert im.mode == "RGB" and im.width > image.shape[2]
    loc = json.loads((out / "localization.json").read_text())
    assert [r["id"] for r in loc["images"]] == [a.id for a in val_set.annotations]
    for rec, ann in zip(loc["images"], val_set.annotations):
        assert rec["classes"] == [classes[c] for c in np.flatnonzero(ann.labels)]
        assert len(rec["points"]) == len(rec["classes"])
        for b in rec["boxes"]:
            x1, y1, x2, y2 = b["bbox"]
            assert 0 <= x1 < x2 <= rec["width"] and 0 <= y1 < y2 <= rec["height"] and b["class"] in rec["classes"]
    coco = json.loads((out / "boxes_coco.json").read_text())
    assert len(coco) == manifest["counts"]["boxes"] > 0
    for det in coco:
        assert set(det) == {"image_id", "category_id", "bbox", "score"}
        assert 1 <= det["category_id"] <= len(classes) and det["bbox"][2] > 0 and det["bbox"][3] > 0
        assert 0.0 <= det["score"] <= 1.0


@pytest.mark.parametrize("scales, flip", [((1.0,), False), ((1.0, 0.5), True)])
def test_packed_cam_files_give_the_full_maps_of_every_class(val_set, tmp_path, scales, flip):
    # wsl-cams/2 stores the used classes' maps and every class's raw maps; read back, the other classes'
    # maps are those --full-maps (wsl-cams/1) stores at image resolution, up to float16 rounding.
    model = _model(len(val_set.classes)).eval()
    kw = dict(scales=scales, flip=flip, progress=False, batch_size=2)
    packed = export_cams(model, val_set.classes, val_set, tmp_path / "packed", **kw)
    full = export_cams(model, val_set.classes, val_set, tmp_path / "full", full_maps=True, **kw)
    assert (packed["format"], full["format"]) == ("wsl-cams/2", "wsl-cams/1")
    for ann in val_set.annotations:
        a, names_a, scores_a = load_cam_npz(tmp_path / "packed" / "cams" / f"{ann.id}.npz")
        with np.load(tmp_path / "full" / "cams" / f"{ann.id}.npz") as z:
            b, names_b, scores_b = z["cams"], z["classes"].tolist(), z["scores"]
        assert names_a == names_b and np.array_equal(scores_a, scores_b) and a.shape == b.shape
        used = ann.labels > 0.5
        assert np.array_equal(a[used], b[used].astype(np.float32))  # the used maps: the same float16 values
        np.testing.assert_allclose(a[~used], b[~used].astype(np.float32), atol=2e-3)
    for name in ("masks", "records"):  # everything else is the same
        for f in sorted((tmp_path / "full" / name).iterdir()):
            assert f.read_bytes() == (tmp_path / "packed" / name / f.name).read_bytes()


def test_packed_cam_files_are_refused_when_inconsistent(tmp_path):
    good = dict(used_cams=np.zeros((1, 4, 5), np.float16), used_classes=np.array([1], np.int32),
                classes=np.array(["a", "b"]), scores=np.zeros(2, np.float32))
    np.savez(tmp_path / "ok.npz", **good)
    cams, names, _ = load_cam_npz(tmp_path / "ok.npz")  # no pass maps: the other class is zero
    assert cams.shape == (2, 4, 5) and names == ["a", "b"] and not cams.any()
    for bad in ({"used_classes": np.array([2], np.int32)}, {"used_classes": np.array([0, 0], np.int32)},
                {"used_cams": np.zeros((4, 5), np.float16)}):
        np.savez(tmp_path / "bad.npz", **{**good, **bad})
        with pytest.raises(DataError, match="bad.npz: used_cams .* and used_classes .* do not match"):
            load_cam_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "geo.npz", **good, pass_maps_0=np.zeros((1, 2, 2, 2), np.float16), geometry=np.array("{}"))
    with pytest.raises(DataError, match="geo.npz: its pass maps and geometry do not give 2 class maps"):
        load_cam_npz(tmp_path / "geo.npz")
    geometry = json.dumps({"image_size": [4, 5], "input_sizes": [[4, 5]], "stride": 2.0, "offset": 0.0, "flip": False,
                           "normalize": "max"})
    np.savez(tmp_path / "three.npz", **good, pass_maps_0=np.zeros((1, 3, 2, 2), np.float16),
             geometry=np.array(geometry))
    with pytest.raises(DataError, match=r"three.npz: .* \(pass maps must be \(1, 2, h, w\), got \[\(1, 3, 2, 2\)\]\)"):
        load_cam_npz(tmp_path / "three.npz", lazy=True)  # refused when read, not when a map is first decoded


def test_packed_cam_maps_read_lazily_give_the_full_array(val_set, tmp_path):
    # load_cam_npz(lazy=True) decodes a class's map when it is read: every way the benchmark reads one
    # gives what the eager read (every class upsampled at once) gives.
    from wsl.cam.files import CamMaps

    export_cams(_model(len(val_set.classes)).eval(), val_set.classes, val_set, tmp_path / "o", scales=(1.0, 0.5),
                flip=True, progress=False)
    path = tmp_path / "o" / "cams" / f"{val_set.annotations[0].id}.npz"
    full, _, _ = load_cam_npz(path)
    lazy, names, _ = load_cam_npz(path, lazy=True)
    c = len(names)
    assert isinstance(lazy, CamMaps) and isinstance(full, np.ndarray) and full.dtype == np.float32
    assert lazy.shape == full.shape and len(lazy) == c and np.array_equal(np.asarray(lazy), full)
    for key in (0, c - 1, -1, slice(1, 4), np.array([3, 0, 3]), np.arange(c) % 2 == 0):
        assert np.array_equal(lazy[key], full[key]), key
    perm = np.random.default_rng(0).permutation(c)
    assert np.array_equal(np.asarray(lazy.reorder(perm)), full[perm])
    assert np.array_equal(lazy.reorder(perm)[2], full[perm[2]]) and lazy.all_finite()
    with pytest.raises(IndexError):
        lazy[c]


def _bench_source_counting_upsampled_maps(monkeypatch):
    """A list that ClassMaps.upsample appends the number of maps it upsamples to."""
    from wsl.cam.extract import ClassMaps

    decoded, upsample = [], ClassMaps.upsample

    def counted(self, rows=None, **kw):
        out = upsample(self, rows, **kw)
        decoded.append(len(out) if rows is not None else out.shape[0] * out.shape[1])
        return out
    monkeypatch.setattr(ClassMaps, "upsample", counted)
    return decoded


@pytest.mark.parametrize("rank_by", ["score", "map"])
def test_bench_scores_packed_files_as_full_ones_decoding_only_what_it_reads(val_set, tmp_path, monkeypatch,
                                                                            rank_by):
    # wsl bench on a wsl-cams/2 export gives the numbers of the --full-maps export; the metrics read only
    # the tagged classes, whose maps the files store, so no other class is upsampled, except that
    # ranking point_map by the maps' maxima reads every class.
    from wsl.bench import BenchSettings, NpzCamSource, evaluate

    model = _model(len(val_set.classes)).eval()
    for name, full_maps in (("packed", False), ("full", True)):
        export_cams(model, val_set.classes, val_set, tmp_path / name, progress=False, full_maps=full_maps)
    decoded = _bench_source_counting_upsampled_maps(monkeypatch)
    settings = BenchSettings(rank_by=rank_by)
    got = {name: evaluate(NpzCamSource(tmp_path / name, val_set.classes), val_set, settings=settings)
           for name in ("packed", "full")}
    assert set(got["packed"]) == set(got["full"]) and "point_map" in got["packed"]
    for k, v in got["full"].items():
        assert got["packed"][k] == (v if isinstance(v, str) else pytest.approx(v, abs=1e-9)), k
    untagged = sum(int((ann.labels < 0.5).sum()) for ann in val_set.annotations)
    assert sum(decoded) == (0 if rank_by == "score" else untagged)


def test_bench_from_a_checkpoint_upsamples_only_the_maps_it_reads(val_set, monkeypatch):
    # ModelCamSource with the cam method hands each image's class maps over undecoded (CamMaps): the
    # numbers are those of every class upsampled at once, and each tagged class is upsampled once.
    from wsl.bench import BenchSettings, ModelCamSource, evaluate

    model = _model(len(val_set.classes)).eval()
    extractor = CAMExtractor(model)
    eager = evaluate(ModelCamSource(model, val_set, batch_size=2, device="cpu",
                                    method=lambda images, select: extractor(images)), val_set)
    decoded = _bench_source_counting_upsampled_maps(monkeypatch)
    lazy = evaluate(ModelCamSource(model, val_set, batch_size=2, device="cpu"), val_set)
    assert lazy.pop("method") == "cam" and eager.pop("method") != "cam"  # a plain callable
    assert lazy == eager and "point_map" in lazy
    assert sum(decoded) == sum(int((ann.labels > 0.5).sum()) for ann in val_set.annotations)
    decoded.clear()
    evaluate(ModelCamSource(model, val_set, batch_size=2, device="cpu"), val_set, metrics=["point_map"],
             settings=BenchSettings(rank_by="map"))
    assert sum(decoded) == len(val_set) * len(val_set.classes) + sum(int((a.labels > 0.5).sum())
                                                                     for a in val_set.annotations)


def test_point_map_refuses_to_rank_files_with_and_without_scores_alike(val_set, tmp_path):
    # A wsl-cams/2 file (scores, its maxima not read) among files without scores: ranking them alike
    # would need every class's maximum of every file; the error says to rank by the maps.
    from wsl.bench import NpzCamSource, evaluate

    export_cams(_model(len(val_set.classes)).eval(), val_set.classes, val_set, tmp_path / "o", progress=False)
    first = tmp_path / "o" / "cams" / f"{val_set.annotations[0].id}.npz"
    cams, names, _ = load_cam_npz(first)
    first.unlink()
    np.savez(first, cams=cams.astype(np.float16), classes=np.array(names))  # another tool's file, no scores
    with pytest.raises(DataError, match="point_map: some CAM files hold image scores and others do not"):
        evaluate(NpzCamSource(tmp_path / "o", val_set.classes), val_set, metrics=["point_map"])


def test_exported_npz_is_read_by_the_benchmark(val_set, tmp_path):
    from wsl.bench import NpzCamSource, read_npz_classes

    export_cams(_model(len(val_set.classes)), val_set.classes, val_set, tmp_path / "o", progress=False)
    assert read_npz_classes(tmp_path / "o" / "cams") == val_set.classes
    cams, scores = NpzCamSource(tmp_path / "o" / "cams", val_set.classes).load(val_set.annotations[0].id)
    assert cams.shape[0] == len(val_set.classes) and scores.shape == (len(val_set.classes),)


def test_export_image_folder_uses_predicted_classes_and_mixed_sizes(image_dir, tmp_path):
    classes = ["cat", "dog", "bird"]
    dataset = ImageFolderDataset(image_dir, classes)
    assert [a.id for a in dataset.annotations] == ["a", "b", "c"]
    model = _model(3).train()
    manifest = export_cams(model, classes, dataset, tmp_path / "o", batch_size=4, progress=False,
                           crf=DenseCRF(iterations=2))
    assert model.training  # the caller's mode is restored
    assert manifest["options"]["classes_from"] == "predicted" and manifest["counts"]["images"] == 3
    assert manifest["options"]["crf"]["iterations"] == 2
    loc = json.loads((tmp_path / "o" / "localization.json").read_text())
    assert [(r["id"], r["height"], r["width"]) for r in loc["images"]] == [("a", 40, 48), ("b", 40, 48), ("c", 36, 30)]
    for rec in loc["images"]:
        assert len(rec["classes"]) >= 1  # at least the top predicted class
        best = max(rec["scores"], key=rec["scores"].get)
        assert best in rec["classes"]
    coco = json.loads((tmp_path / "o" / "boxes_coco.json").read_text())
    assert {d["image_id"] for d in coco} <= {"a", "b", "c"}


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing", ["a"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", ["a"])


def test_refuses_a_non_empty_output_without_overwrite(image_dir, tmp_path):
    dataset = ImageFolderDataset(image_dir, ["x", "y"])
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="overwrite"):
        export_cams(_model(2), ["x", "y"], dataset, out, progress=False)
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
    with pytest.raises(OutputExistsError, match="not a `wsl cam` output"):  # not ours: never emptied
        export_cams(_model(2), ["x", "y"], dataset, out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
    (out / "keep.txt").unlink()
    export_cams(_model(2), ["x", "y"], dataset, out, progress=False)
    (out / "stale.txt").write_text("left by an earlier export")
    export_cams(_model(2), ["x", "y"], dataset, out, overwrite=True, progress=False)  # our own output
    assert not (out / "stale.txt").exists() and (out / "cams" / "a.npz").is_file()


def test_a_failed_write_never_leaves_a_partial_file(image_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = np.lib.format.write_array

    def flaky(fp, array, **kw):
        calls["n"] += 1
        if calls["n"] == 8:  # the second image's first array (7 per wsl-cams/2 file): half, then die
            fp.write(b"\x93NUMPY truncated")
            raise OSError("disk full")
        real(fp, array, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", flaky)
    out = tmp_path / "o"
    with pytest.raises(OSError, match="disk full"):
        export_cams(_model(2), ["x", "y"], ImageFolderDataset(image_dir, ["x", "y"]), out, progress=False)
    assert sorted(p.name for p in (out / "cams").iterdir()) == ["a.npz"]  # no b.npz, no temporary file
    assert load_cam_npz(out / "cams" / "a.npz")[0].shape == (2, 40, 48)
    assert not (out / "manifest.json").exists()


def test_dataset_classes_must_be_known_to_the_model(val_set, tmp_path):
    with pytest.raises(DataError, match="not among the model's classes"):
        export_cams(_model(2), ["x", "y"], val_set, tmp_path / "o", progress=False)
    # the same names in another order are remapped by name
    classes = list(reversed(val_set.classes))
    export_cams(_model(len(classes)), classes, val_set, tmp_path / "r", progress=False)
    loc = json.loads((tmp_path / "r" / "localization.json").read_text())
    ann = val_set.annotations[0]
    assert sorted(loc["images"][0]["classes"]) == sorted(val_set.classes[c] for c in np.flatnonzero(ann.labels))


def test_cli_from_a_checkpoint(val_set, scenes_root, image_dir, tmp_path, capsys):
    classes = val_set.classes
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, classifier_checkpoint(_model(len(classes)), classes))
    out = tmp_path / "cli"
    args = ["-q", "cam", "--checkpoint", str(ckpt), "--data", f"voc:{scenes_root}", "--split", "val",
            "--out", str(out), "--scales", "1.0", "0.5", "--flip", "--tau", "0.4", "--crf", "--batch-size", "4",
            "--device", "cpu"]
    assert cli_main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["scales"] == [1.0, 0.5] and manifest["options"]["tau"] == 0.4
    assert manifest["options"]["crf"] is not None and manifest["counts"]["images"] == len(val_set)
    assert cli_main(args) == 1
    assert "not empty" in capsys.readouterr().err
    folder = ["-q", "cam", "--checkpoint", str(ckpt), "--images", str(image_dir), "--out", str(tmp_path / "f")]
    assert cli_main(folder) == 0
    assert len(list((tmp_path / "f" / "cams").glob("*.npz"))) == 3
    assert cli_main(["-q", "cam", "--checkpoint", str(ckpt), "--data", f"voc:{scenes_root}",
                     "--out", str(tmp_path / "g")]) == 1
    assert "--split" in capsys.readouterr().err


def test_coco_results_use_the_annotation_files_ids(scenes_root, tmp_path):
    coco_spec = f"coco:{scenes_root}/coco/instances_val.json:{scenes_root}/VOCdevkit/VOC2012/JPEGImages"
    dataset = build_dataset(coco_spec, "val")
    export_cams(_model(len(dataset.classes)), dataset.classes, dataset, tmp_path / "o", progress=False)
    results = json.loads((tmp_path / "o" / "boxes_coco.json").read_text())
    assert results
    gt = dataset.coco
    dets = gt.loadRes(str(tmp_path / "o" / "boxes_coco.json"))  # refuses image ids it does not know
    assert set(dets.getImgIds()) <= set(gt.getImgIds())
    assert {d["category_id"] for d in results} <= set(gt.getCatIds())


# ------------------------------------------------------------------------------------ interruption
def _tree(root: Path) -> dict:
    """Relative path -> bytes of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_files_are_byte_for_byte_reproducible(image_dir, tmp_path):
    dataset = ImageFolderDataset(image_dir, ["x", "y"])
    for name in ("a", "b"):
        export_cams(_model(2), ["x", "y"], dataset, tmp_path / name, progress=False)
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert first == second and "cams/a.npz" in first  # no timestamps inside the .npz files


def test_resume_recomputes_only_unfinished_images_and_matches_a_full_run(val_set, tmp_path, monkeypatch):
    classes = val_set.classes
    model = _model(len(classes)).eval()
    kw = dict(batch_size=3, scales=(1.0, 0.75), progress=False)
    export_cams(model, classes, val_set, tmp_path / "full", **kw)
    out = tmp_path / "cut"
    export_cams(model, classes, val_set, out, **kw)
    ids = [a.id for a in val_set.annotations]
    # What a kill leaves: the JSON files of the end missing, one image killed between its files, whole
    # images missing, and the temporary file of a write in progress.
    for name in ("manifest.json", "localization.json", "boxes_coco.json"):
        (out / name).unlink()
    (out / "masks" / f"{ids[2]}.png").unlink()
    (out / "records" / f"{ids[2]}.json").unlink()
    for i in (5, 6, 7):
        for d, ext in (("cams", ".npz"), ("overlays", ".png"), ("masks", ".png"), ("records", ".json")):
            (out / d / f"{ids[i]}{ext}").unlink()
    (out / "cams" / f".{ids[6]}.k3x9.tmp.npz").write_bytes(b"PK\x03\x04 half")

    import wsl.cam.export as export_module
    written = []
    real = export_module.atomic_write_bytes  # the CAM file's writer

    def write(path, data):
        written.append(Path(path).stem)
        real(path, data)
    monkeypatch.setattr(export_module, "atomic_write_bytes", write)
    manifest = export_cams(model, classes, val_set, out, resume=True, **kw)
    assert sorted(written) == [ids[i] for i in (2, 5, 6, 7)]  # finished images are not written again
    assert manifest["counts"]["images"] == len(val_set)
    assert _tree(out) == _tree(tmp_path / "full")
    # resuming a finished export rewrites nothing and changes nothing
    written.clear()
    export_cams(model, classes, val_set, out, resume=True, **kw)
    assert written == [] and _tree(out) == _tree(tmp_path / "full")


def test_resume_refuses_other_settings_and_foreign_directories(val_set, tmp_path):
    classes = val_set.classes
    model = _model(len(classes))
    out = tmp_path / "o"
    export_cams(model, classes, val_set, out, batch_size=4, progress=False)
    with pytest.raises(DataError, match=r"options\.tau=0\.5 \(this run: 0\.3\)"):
        export_cams(model, classes, val_set, out, batch_size=4, tau=0.3, resume=True, progress=False)
    with pytest.raises(DataError, match=r"options\.batch_size=4 \(this run: 2\)"):
        export_cams(model, classes, val_set, out, batch_size=2, resume=True, progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        export_cams(model, classes, val_set, out, resume=True, overwrite=True, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="no options.json"):
        export_cams(model, classes, val_set, foreign, resume=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    # nothing to resume yet: a plain export
    manifest = export_cams(model, classes, val_set, tmp_path / "new", resume=True, progress=False)
    assert manifest["counts"]["images"] == len(val_set)


def test_sigkill_then_resume_gives_the_uninterrupted_output(scenes_root, tmp_path):
    """`wsl cam` killed with SIGKILL part-way (after a random number of images), then `--resume`."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    train = build_dataset(f"voc:{scenes_root}", "train")
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, classifier_checkpoint(_model(len(train.classes)), train.classes))
    args = ["-q", "cam", "--checkpoint", str(ckpt), "--data", f"voc:{scenes_root}", "--split", "train",
            "--batch-size", "2", "--device", "cpu"]
    assert cli_main([*args, "--out", str(tmp_path / "full")]) == 0
    seed = random.randrange(2**32)
    k = random.Random(seed).randint(1, len(train) // 2)  # images finished before the kill
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same threads, same floats
    proc = subprocess.Popen([sys.executable, "-m", "wsl", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (out / "records").is_dir() or sum(not p.name.startswith(".")
                                                    for p in (out / "records").iterdir()) < k:
            assert proc.poll() is None, f"wsl cam ended before the kill (seed {seed}): {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, f"no progress within 120 s (seed {seed})"
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists(), f"the kill came too late (seed {seed}, k={k})"
    assert cli_main([*args, "--out", str(out)]) == 1  # not empty: refused without --resume
    assert cli_main([*args, "--out", str(out), "--resume"]) == 0
    got, want = _tree(out), _tree(tmp_path / "full")
    assert sorted(got) == sorted(want), f"seed {seed}, k={k}"
    assert [name for name in want if got[name] != want[name]] == [], f"seed {seed}, k={k}"


def test_ids_sharing_a_file_name_are_refused_before_anything_is_deleted(val_set, tmp_path):
    val_set.annotations[1].id, val_set.annotations[2].id = "x/y", "x__y"
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="'x/y' and 'x__y' map to the same file name 'x__y'"):
        export_cams(_model(len(val_set.classes)), val_set.classes, val_set, out, overwrite=True, progress=False)
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("scales, flip, crf", [((1.0,), False, False), ((1.0, 0.75), True, False),
                                               ((1.0,), False, True)])
def test_localize_upsamples_only_the_used_classes_with_the_full_maps_results(val_set, scales, flip, crf):
    # The export upsamples the used classes' maps only; maps, points, boxes and pseudo-masks of those
    # classes are exactly those of the full (N, C, H, W) maps (the path before issue 17).
    model = _model(40).eval()  # more classes than tags: most maps are never upsampled
    images = torch.stack([val_set[i]["image"] for i in range(4)])
    x = imagenet_normalizer(images)
    ext = CAMExtractor(model, scales=scales, flip=flip)
    full = ext(x)
    maps = ext.class_maps(x)
    select = select_classes(scores=maps.scores, threshold=float(maps.scores.quantile(0.9)))  # a few per image
    assert 0 < int(select.sum()) < 40 and select.sum(1).max() > 1
    opt = ExportOptions(box_mode="all")
    dense = DenseCRF(iterations=2) if crf else None
    got = localize(maps, select, opt, crf=dense, images=images)
    used = got.used
    assert torch.equal(used.cams[used.valid], full.cams[select])
    points, values = argmax_points(full.cams)
    assert torch.equal(got.points[used.valid], points[select]) and torch.equal(got.values[used.valid], values[select])
    want_peaks = local_maxima(full.cams, min_distance=opt.peak_min_distance, rel_threshold=opt.peak_threshold,
                              top_k=opt.peak_top_k, select=select)
    want_boxes = cam_boxes(full.cams, tau=opt.tau, mode=opt.box_mode, select=select)
    for a, b in zip(got.peaks + got.boxes, want_peaks + want_boxes):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in vars(b))
    if crf:
        want_masks = crf_pseudo_masks(dense, images, full.cams, select, method=opt.mask_method, fg=opt.mask_fg,
                                      bg=opt.mask_bg)
    else:
        want_masks = pseudo_masks(full.cams, select, method=opt.mask_method, fg=opt.mask_fg, bg=opt.mask_bg)
    assert torch.equal(got.masks, want_masks)
    # full maps (the other CAM methods' output) take the same route
    assert torch.equal(localize(full.cams, select, opt, crf=dense, images=images).masks, want_masks)


def test_exported_files_hold_every_class_map_as_the_full_path_computes_it(image_dir, tmp_path):
    # Unused classes are upsampled for the file only; the file is the float16 of every full map (--full-maps),
    # and a wsl-cams/2 file gives the same maps up to float16 rounding of the raw maps.
    classes = [f"c{k}" for k in range(12)]
    model = _model(len(classes)).eval()
    ds = ImageFolderDataset(image_dir, classes)
    export_cams(model, classes, ds, tmp_path / "o", scales=(1.0, 0.5), flip=True, progress=False, full_maps=True)
    export_cams(model, classes, ds, tmp_path / "p", scales=(1.0, 0.5), flip=True, progress=False)
    ext = CAMExtractor(model, scales=(1.0, 0.5), flip=True)
    for i in range(len(ds)):
        sample = ds[i]
        want = ext(imagenet_normalizer(sample["image"][None])).cams[0].numpy()
        with np.load(tmp_path / "o" / "cams" / f"{sample['id']}.npz") as z:
            np.testing.assert_array_equal(z["cams"], want.astype(np.float16))
        np.testing.assert_allclose(load_cam_npz(tmp_path / "p" / "cams" / f"{sample['id']}.npz")[0], want, atol=2e-3)


@pytest.mark.parametrize("shards", [None, 2])
def test_more_classes_than_uint8_masks_hold_export_everything_but_masks(image_dir, tmp_path, shards):
    # ImageNet-sized heads: uint8 pseudo-masks cannot label class 254 and up, so there are none; every other
    # output is written, and the CAM files hold all 300 classes in a few cells each.
    classes = [f"c{k}" for k in range(300)]
    model, ds = _model(300).eval(), ImageFolderDataset(image_dir, classes)
    with pytest.raises(ValueError, match="the CRF refines pseudo-masks"):
        export_cams(model, classes, ds, tmp_path / "crf", crf=DenseCRF(), progress=False)
    assert not (tmp_path / "crf").exists()
    out = tmp_path / "o"
    manifest = export_cams(model, classes, ds, out, progress=False, shards=shards)
    assert manifest["counts"]["masks"] == 0 and manifest["counts"]["images"] == len(ds) > 0
    assert json.loads((out / "options.json").read_text())["pseudo_masks"] is False
    if shards is None:
        assert "masks" not in manifest["files"] and not (out / "masks").exists()
        assert sorted(p.name for p in (out / "cams").iterdir()) == sorted(f"{ds[i]['id']}.npz" for i in range(len(ds)))
        cams, names, _ = load_cam_npz(out / "cams" / f"{ds[0]['id']}.npz")
    else:
        assert "masks" not in manifest["files"]["members"]
        from wsl.utils.shards import iter_shard, shard_paths
        members = [files for path in shard_paths(out) for _, files in iter_shard(path)]
        assert len(members) == len(ds) and all(set(m) == {"cams.npz", "overlay.png", "json"} for m in members)
        cams, names, _ = load_cam_npz("member", members[0]["cams.npz"])
    assert cams.shape[0] == 300 and names == classes
    records = json.loads((out / "localization.json").read_text())["images"]
    assert all(r["classes"] and len(r["points"]) == len(r["classes"]) for r in records)  # predicted classes
    again = export_cams(model, classes, ds, out, progress=False, shards=shards, resume=True)  # nothing left to do
    assert again["counts"] == manifest["counts"]


def test_packed_cam_files_store_the_raw_maps_uncompressed(tmp_path):
    import zipfile

    from wsl.cam.files import packed_cam_npz_bytes

    geometry = {"image_size": [8, 8], "input_sizes": [[8, 8]], "stride": 4.0, "offset": 1.5, "flip": False,
                "normalize": "max"}
    data = packed_cam_npz_bytes(np.ones((1, 8, 8)), [0], ["a", "b"], np.zeros(2), [np.ones((1, 2, 2, 2))], geometry)
    (tmp_path / "f.npz").write_bytes(data)
    with zipfile.ZipFile(tmp_path / "f.npz") as zf:
        kinds = {i.filename: i.compress_type for i in zf.infolist()}
    assert kinds.pop("pass_maps_0.npy") == zipfile.ZIP_STORED and set(kinds.values()) == {zipfile.ZIP_DEFLATED}
    cams, names, _ = load_cam_npz(tmp_path / "f.npz")
    assert cams.shape == (2, 8, 8) and names == ["a", "b"] and np.allclose(cams, 1.0)
    assert data == packed_cam_npz_bytes(np.ones((1, 8, 8)), [0], ["a", "b"], np.zeros(2), [np.ones((1, 2, 2, 2))],
                                        geometry)  # reproducible bytes
