"""wsl bench: sources, the evaluate() loop against independent references, reports, comparison, CLI."""
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import reference_metrics as ref
from wsl.cam.files import load_cam_npz
from wsl.bench import (METRICS, BenchSettings, ModelCamSource, NpzCamSource, cam_file_stem, compare_runs, evaluate,
                       load_run, read_npz_classes)
from wsl.data.base import Annotation
from wsl.errors import DataError
from wsl.metrics.localization import default_thresholds

CLASSES = ["disc", "square", "star"]
H, W = 32, 40
THRESHOLDS = default_thresholds(0.05)  # coarse, so the brute-force references stay quick


class MemoryDataset:
    """The parts of WSLDataset that the benchmark uses, held in memory."""

    def __init__(self, annotations, masks=None, classes=CLASSES):
        self.classes = list(classes)
        self.annotations = annotations
        self.masks = masks

    def __len__(self):
        return len(self.annotations)

    def load_mask(self, i):
        return None if self.masks is None else self.masks[i]

    def load_image(self, i):
        return np.random.default_rng(i).integers(0, 256, (H, W, 3), dtype=np.uint8)

    def __repr__(self):
        return f"MemoryDataset({len(self)} images)"


def _blob(cx, cy, sigma):
    yy, xx = np.mgrid[0:H, 0:W]
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))


def make_scenes(n=24, seed=0):
    """Rectangles of 3 classes with masks, boxes (some difficult, some on the border) and CAM-like maps."""
    rng = np.random.default_rng(seed)
    anns, masks, cams, scores = [], [], [], []
    for i in range(n):
        k = int(rng.integers(1, 4))
        mask = np.zeros((H, W), np.uint8)
        boxes, labels = [], []
        for _ in range(k):
            c = int(rng.integers(0, 3))
            x1, y1 = int(rng.integers(0, W - 4)), int(rng.integers(0, H - 4))
            x2, y2 = int(min(W, x1 + rng.integers(4, 20))), int(min(H, y1 + rng.integers(4, 16)))
            mask[y1:y2, x1:x2] = c + 1
            boxes.append([x1, y1, x2, y2])
            labels.append(c)
        mask[np.roll(mask, 1, axis=1) != mask] = 255  # a VOC-like boundary band
        difficult = rng.random(k) < 0.2
        lab = np.zeros(3, np.float32)
        lab[labels] = 1
        cam = 0.3 * rng.random((3, 4, 5))
        cam = np.stack([cv2.resize(m, (W, H), interpolation=cv2.INTER_LINEAR) for m in cam])
        for (x1, y1, x2, y2), c in zip(boxes, labels):
            jitter = rng.normal(0, 3, 2)
            cam[c] += _blob((x1 + x2) / 2 + jitter[0], (y1 + y2) / 2 + jitter[1], 2 + (x2 - x1) / 4)
        s = rng.normal(0, 1, 3) + 2 * lab
        anns.append(Annotation(id=f"img{i:03d}", image_path=Path(f"img{i:03d}.jpg"), labels=lab,
                               boxes=np.array(boxes, np.float32), box_labels=np.array(labels, np.int64),
                               difficult=difficult, mask_path=Path(f"img{i:03d}.png"), size=(H, W)))
        masks.append(mask)
        cams.append(cam)
        scores.append(s)
    if n >= 4:
        cams[1][0] = 0.7  # flat map
        cams[2][:] = 0.0  # all-zero maps
        cams[3][1, 5, 5] = np.nan  # a map with a NaN
    return MemoryDataset(anns, masks), cams, scores


def write_npz(directory, dataset, cams, scores, classes=CLASSES):
    directory.mkdir(parents=True, exist_ok=True)
    for ann, c, s in zip(dataset.annotations, cams, scores):
        np.savez_compressed(directory / f"{cam_file_stem(ann.id)}.npz", cams=c.astype(np.float16),
                            classes=np.array(classes), scores=np.asarray(s, np.float32))
    return directory


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    dataset, cams, scores = make_scenes()
    cam_dir = write_npz(tmp_path_factory.mktemp("cams"), dataset, cams, scores)
    return dataset, cam_dir


@pytest.fixture(scope="module")
def bench_run(scenes, tmp_path_factory):
    dataset, cam_dir = scenes
    out = tmp_path_factory.mktemp("run")
    metrics = evaluate(NpzCamSource(cam_dir, CLASSES), dataset, thresholds=THRESHOLDS, out_dir=out)
    return metrics, out


def _reference_metrics(dataset, cam_dir, protocol="published"):
    """Every headline metric recomputed image by image with tests/reference_metrics.py: MaxBoxAcc(V2) and
    top-1 with wsolevaluation's boxes and the pointing game as TorchRay (boxes, mean over all classes)
    under "published", with exact components and the masks under "wsl-exact"."""
    published = protocol == "published"
    sweep = ref.wsol_box_sweep if published else ref.box_sweep
    loaded = [load_cam_npz(cam_dir / f"{a.id}.npz") for a in dataset.annotations]
    cams = [z[0].astype(np.float64) for z in loaded]
    scores = np.stack([z[2].astype(np.float64) for z in loaded])
    anns, masks = dataset.annotations, dataset.masks
    labels = np.stack([a.labels for a in anns])
    out = {}
    gt = np.zeros(labels.shape)
    for i, a in enumerate(anns):
        for c in range(3):
            mine = a.box_labels == c
            gt[i, c] = 0 if mine.any() and a.difficult[mine].all() else (1 if labels[i, c] else -1)
    aps = [ref.voc_cls_ap(scores[:, c].tolist(), gt[:, c].tolist()) for c in range(3)]
    out["cls_map"] = np.nanmean(aps)
    out["point_map"] = np.nanmean(ref.point_map(cams, labels, [a.boxes for a in anns], [a.box_labels for a in anns],
                                                [a.difficult for a in anns], rank_scores=scores))
    samples, hard, corloc, pairs, pair_cls = [], [], {}, [], []
    v1_curves, px_maps, px_pos, px_neg = {}, [], [], []
    for i, (a, cam, mask) in enumerate(zip(anns, cams, masks)):
        for c in range(3):
            plain = (a.box_labels == c) & ~a.difficult
            if not plain.any():
                continue
            boxes = a.boxes[a.box_labels == c].astype(np.float64)
            _, point = ref.first_argmax(cam[c])
            region = ref.voc_box_mask(boxes, (H, W))  # every box of the class, difficult ones too
            if not published and (mask == c + 1).any():
                region = mask == c + 1
            samples.append((c, point, region))
            if labels[i].sum() >= 2 and region.sum() < 0.25 * H * W:
                hard.append((c, point, region))
            norm = ref.minmax(cam[c])
            corloc.setdefault(c, []).append(ref.box_sweep(norm, boxes, [0.2])[0][0] >= 0.5)
            pairs.append((norm, boxes))
            pair_cls.append(c)
            v1_curves[(i, c)] = sweep(norm, boxes, THRESHOLDS)[0] >= 0.5
            if (mask == c + 1).any():
                px_maps.append(norm)
                px_pos.append(mask == c + 1)
                px_neg.append((mask != c + 1) & (mask != 255))
    if published:  # TorchRay's counters over all three classes
        out["pointing_game"] = ref.torchray_pointing_game(samples, 3)[0]
        out["pointing_game_difficult"] = ref.torchray_pointing_game(hard, 3)[0]
    else:
        out["pointing_game"] = np.mean([np.mean([ref.torchray_hit(p, r) for k, p, r in samples if k == c])
                                        for c in sorted({k for k, _, _ in samples})])
    out["corloc"] = np.mean([np.mean(v) for v in corloc.values()])
    out["maxboxacc"], out["maxboxaccv2"] = ref.max_box_acc(pairs, THRESHOLDS, sweep=sweep)
    best = int(np.argmax(np.mean(list(v1_curves.values()), axis=0)))
    top1 = []
    for i, a in enumerate(anns):
        if not any((i, c) in v1_curves for c in range(3)):
            continue
        top = int(np.argmax(scores[i]))
        if (i, top) in v1_curves:
            top1.append(v1_curves[(i, top)][best])
        elif not labels[i, top]:
            top1.append(False)
    out["top1_loc"] = np.mean(top1)
    out["pxap"] = ref.pxap(px_maps, px_pos, px_neg, THRESHOLDS)
    cm = np.zeros((4, 4), np.int64)
    for i, (a, cam, mask) in enumerate(zip(anns, cams, masks)):
        cam = np.nan_to_num(cam, nan=0.0)
        chan = [np.full((H, W), 0.3)]
        for c in range(3):
            m = np.clip(cam[c], 0, None)
            m = m / m.max() if m.max() > 1e-12 else np.zeros_like(m)
            chan.append(m if labels[i, c] else np.full((H, W), -np.inf))
        cm += ref.confusion(np.argmax(np.stack(chan), axis=0), mask, 4)
    out["pseudo_mask_miou"] = ref.miou(cm)
    return out


@pytest.mark.parametrize("protocol", ["published", "wsl-exact"])
def test_evaluate_agrees_with_reference_metrics(scenes, bench_run, protocol):
    dataset, cam_dir = scenes
    if protocol == "published":
        metrics, _ = bench_run  # the default
    else:
        metrics = evaluate(NpzCamSource(cam_dir, CLASSES), dataset, thresholds=THRESHOLDS, protocol=protocol)
    expected = _reference_metrics(dataset, cam_dir, protocol)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert 0.0 < metrics["maxboxacc"] <= 1.0 and metrics["num_images"] == len(dataset)
    assert metrics["protocol"] == protocol


def test_protocols_differ_where_the_conventions_do(scenes, bench_run):
    dataset, cam_dir = scenes
    published, _ = bench_run
    exact = evaluate(NpzCamSource(cam_dir, CLASSES), dataset, thresholds=THRESHOLDS,
                     settings=BenchSettings(protocol="wsl-exact"))
    for key in ("cls_map", "point_map", "corloc", "pxap", "pseudo_mask_miou"):  # the same in both
        assert published[key] == exact[key], key
    assert published["maxboxaccv2"] != exact["maxboxaccv2"]  # +1 boxes and holes on these scenes


def _pointing_scene():
    """Two images of 3 classes, built by hand for the pointing-game conventions: class 0's mask lies
    beside its box; class 1 is missed; class 2 never appears."""
    h, w = 24, 40
    mask = np.zeros((h, w), np.uint8)
    mask[4:14, 2:9] = 1  # class 0's mask pixels, x 2..8 ...
    boxes0 = np.array([[20, 4, 30, 14]], np.float32)  # ... but its box is at x 20..29
    cams0 = np.zeros((3, h, w), np.float32)
    cams0[0, 8, 5] = 1.0  # in the mask, 15 px from the box (not strictly closer): hit only on the mask
    ann0 = Annotation(id="a", image_path=Path("a.jpg"), labels=np.array([1, 0, 0], np.float32), boxes=boxes0,
                      box_labels=np.array([0]), difficult=np.array([False]), mask_path=Path("a.png"), size=(h, w))
    mask1 = np.zeros((h, w), np.uint8)
    mask1[0:6, 0:6] = 2
    cams1 = np.zeros((3, h, w), np.float32)
    cams1[1, 20, 35] = 1.0  # far from class 1's box: a miss in both protocols
    ann1 = Annotation(id="b", image_path=Path("b.jpg"), labels=np.array([0, 1, 0], np.float32),
                      boxes=np.array([[0, 0, 6, 6]], np.float32), box_labels=np.array([1]),
                      difficult=np.array([False]), mask_path=Path("b.png"), size=(h, w))
    return MemoryDataset([ann0, ann1], [mask, mask1]), [(cams0, np.ones(3)), (cams1, np.ones(3))]


def test_pointing_game_conventions_built_by_hand(caplog):
    dataset, pairs = _pointing_scene()
    published = evaluate(pairs, dataset, metrics=["pointing_game"])
    exact = evaluate(pairs, dataset, metrics=["pointing_game"], protocol="wsl-exact")
    # published (TorchRay): class 0 misses its box, class 1 misses, class 2 has no pair and counts 0
    assert published["pointing_game"] == 0.0
    assert [published[f"per_class/pointing_game/{c}"] for c in CLASSES] == [0.0, 0.0, 0.0]
    assert "1 of 3 classes have no (image, class) pair" in caplog.text and "star" in caplog.text
    # wsl-exact: class 0 hits its mask, class 1 misses, class 2 is left out of the mean
    assert exact["pointing_game"] == 0.5
    assert math.isnan(exact["per_class/pointing_game/star"])
    # the same scene against TorchRay's counters, written out in the reference
    h, w = dataset.masks[0].shape
    samples = [(0, (5, 8), ref.voc_box_mask(dataset.annotations[0].boxes, (h, w))),
               (1, (35, 20), ref.voc_box_mask(dataset.annotations[1].boxes, (h, w)))]
    assert published["pointing_game"] == pytest.approx(ref.torchray_pointing_game(samples, 3)[0], abs=1e-6)
    # a hit on class 0 alone: 1/3 over all classes (TorchRay), 1/2 over the classes with pairs
    pairs[0][0][0, 8, 5], pairs[0][0][0, 8, 22] = 0.0, 1.0
    assert evaluate(pairs, dataset, metrics=["pointing_game"])["pointing_game"] == pytest.approx(1 / 3, abs=1e-12)
    assert evaluate(pairs, dataset, metrics=["pointing_game"], protocol="wsl-exact")["pointing_game"] == 0.5


def test_protocol_is_recorded_in_every_output(bench_run, tmp_path):
    metrics, out = bench_run
    assert metrics["protocol"] == "published"
    assert json.loads((out / "metrics.json").read_text())["protocol"] == "published"
    assert json.loads((out / "config.json").read_text())["settings"]["protocol"] == "published"
    report = (out / "report.md").read_text()
    assert "- Protocol: `published`, each metric as its published code computes it" in report
    assert "\n| protocol |" not in report  # stated once above the table, not as a metric row
    assert "largest contour (cv2.contourArea" in report and "union of the class's boxes" in report
    table = compare_runs([out])
    assert table.splitlines()[2] == "| protocol | published |"
    with pytest.raises(ValueError, match="unknown protocol 'torchray'"):
        BenchSettings(protocol="torchray")


def test_outputs_are_nan_free_and_complete(bench_run):
    metrics, out = bench_run
    for key in ("cls_map", "point_map", "pointing_game", "corloc", "maxboxacc", "maxboxaccv2", "pxap", "top1_loc",
                "pseudo_mask_miou", "per_class/maxboxacc/disc", "per_class/pseudo_mask_iou/background"):
        assert key in metrics and math.isfinite(metrics[key]), key
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["maxboxacc"] == pytest.approx(metrics["maxboxacc"])
    report = (out / "report.md").read_text()
    assert "| maxboxacc |" in report and "## Per class" in report and "| square |" in report
    for plot in ("per_class.png", "box_accuracy.png", "pr_curves.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG", plot
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["thresholds"] == pytest.approx(THRESHOLDS.tolist())
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # atomic writes left nothing behind


def test_difficult_only_images_count_for_nothing_in_box_metrics(tmp_path):
    dataset, cams, scores = make_scenes(n=7, seed=1)
    dataset.annotations[0].difficult[:] = True  # every object of image 0 is difficult
    dataset.annotations[1] = Annotation(id="img001", image_path=Path("x.jpg"), labels=np.zeros(3, np.float32),
                                        boxes=np.zeros((0, 4), np.float32), box_labels=np.zeros(0, np.int64),
                                        difficult=np.zeros(0, bool), mask_path=None, size=(H, W))  # nothing in it
    dataset.masks[1] = None
    cam_dir = write_npz(tmp_path, dataset, cams, scores)
    with_0 = evaluate(NpzCamSource(cam_dir, CLASSES), dataset, thresholds=THRESHOLDS)
    without_0 = evaluate(NpzCamSource(cam_dir, CLASSES),
                         MemoryDataset(dataset.annotations[1:], dataset.masks[1:]), thresholds=THRESHOLDS)
    assert all(math.isfinite(v) for k, v in with_0.items() if "/" not in k and k != "protocol")
    for key in ("pointing_game", "corloc", "maxboxacc", "maxboxaccv2", "pxap", "top1_loc"):
        assert with_0[key] == without_0[key], key


def test_metric_selection_follows_the_dataset(scenes, caplog):
    dataset, cam_dir = scenes
    no_masks = MemoryDataset([Annotation(**{**a.__dict__, "mask_path": None}) for a in dataset.annotations])
    metrics = evaluate(NpzCamSource(cam_dir, CLASSES), no_masks, thresholds=THRESHOLDS)
    assert "pxap" not in metrics and "pseudo_mask_miou" not in metrics and "maxboxacc" in metrics
    with pytest.raises(DataError, match="'pxap' needs masks"):
        evaluate(NpzCamSource(cam_dir, CLASSES), no_masks, metrics=["pxap"])
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        evaluate(NpzCamSource(cam_dir, CLASSES), dataset, metrics=["nope"])
    coco_like = MemoryDataset(no_masks.annotations, dataset.masks)  # masks rasterised on demand, no files
    assert "pxap" in evaluate(NpzCamSource(cam_dir, CLASSES), coco_like, metrics=["pxap"], thresholds=THRESHOLDS)
    only = evaluate(NpzCamSource(cam_dir, CLASSES), dataset, metrics=["cls_map"])
    assert set(k for k in only if "/" not in k) == {"cls_map", "num_images", "protocol"}


def test_point_map_ranked_by_map_maximum_and_settings_validation(scenes, caplog):
    dataset, cam_dir = scenes
    by_map = evaluate(NpzCamSource(cam_dir, CLASSES), dataset, metrics=["point_map"],
                      settings=BenchSettings(rank_by="map"))
    anns = dataset.annotations
    cams = [load_cam_npz(cam_dir / f"{a.id}.npz")[0].astype(np.float64) for a in anns]
    expected = ref.point_map(cams, np.stack([a.labels for a in anns]), [a.boxes for a in anns],
                             [a.box_labels for a in anns], [a.difficult for a in anns])
    assert by_map["point_map"] == pytest.approx(np.nanmean(expected), abs=1e-9)
    assert "share the same maximum" not in caplog.text
    normalised = [c / np.maximum(np.nanmax(c, axis=(1, 2), keepdims=True), 1e-6) for c in cams]  # as `wsl cam`
    norm_dir = write_npz(cam_dir.parent / "normalised", dataset, normalised, [np.zeros(3)] * len(anns))
    evaluate(NpzCamSource(norm_dir, CLASSES), dataset, metrics=["point_map"], settings=BenchSettings(rank_by="map"))
    assert "share the same maximum" in caplog.text
    with pytest.raises(ValueError, match="rank_by"):
        BenchSettings(rank_by="magic")
    with pytest.raises(ValueError, match="increasing"):
        evaluate(NpzCamSource(cam_dir, CLASSES), dataset, thresholds=[0.5, 0.2])


def test_npz_classes_are_matched_to_the_dataset_by_name(tmp_path, caplog):
    """The dataset's class list is authoritative; a file may store the same names in any order."""
    dataset, cams, scores = make_scenes(n=4)
    plain = evaluate(NpzCamSource(write_npz(tmp_path / "plain", dataset, cams, scores), CLASSES), dataset,
                     thresholds=THRESHOLDS)
    order = [0, 2, 1]  # disc, star, square
    mixed = write_npz(tmp_path / "mixed", dataset, cams, scores)
    for k in (1, 3):  # two of the four files in another order
        ann = dataset.annotations[k]
        np.savez_compressed(mixed / f"{ann.id}.npz", cams=cams[k][order].astype(np.float16),
                            classes=np.array([CLASSES[i] for i in order]), scores=np.asarray(scores[k])[order])
    with caplog.at_level("INFO", logger="wsl.bench.sources"):
        got = evaluate(NpzCamSource(mixed, CLASSES), dataset, thresholds=THRESHOLDS)
    assert got == plain
    notes = [r.getMessage() for r in caplog.records if "matched by name" in r.getMessage()]
    assert notes == ["2 file(s) store their classes in another order than the dataset's (disc, square, star); "
                     "matched by name"]

    every = write_npz(tmp_path / "every", dataset, [c[order] for c in cams], [np.asarray(s)[order] for s in scores],
                      classes=[CLASSES[i] for i in order])
    assert evaluate(NpzCamSource(every, CLASSES), dataset, thresholds=THRESHOLDS) == plain
    # the same files as members of a tar shard (wsl cam --shards) are matched the same way
    from wsl.bench import ShardCamSource
    from wsl.cam.files import cam_npz_bytes
    from wsl.utils.shards import ShardWriter, shard_key

    (tmp_path / "shards").mkdir()
    with ShardWriter(tmp_path / "shards" / "shard-000000.tar") as w:
        for k, ann in enumerate(dataset.annotations):
            perm = order if k in (1, 3) else [0, 1, 2]
            w.add(shard_key(cam_file_stem(ann.id)), {"cams.npz": cam_npz_bytes(
                cams[k][perm], [CLASSES[i] for i in perm], np.asarray(scores[k])[perm])})
    assert evaluate(ShardCamSource(tmp_path / "shards", CLASSES), dataset, thresholds=THRESHOLDS) == plain

    for classes, what in [(["disc", "square", "circle"], "missing 'star'; unknown 'circle'"),
                          (["disc", "square"], "missing 'star'"),
                          (["disc", "square", "star", "moon"], "unknown 'moon'"),
                          (["disc", "disc", "star"], "missing 'square'; named twice 'disc'")]:
        bad = write_npz(tmp_path / "bad", dataset, [c[: len(classes)] if len(classes) <= 3 else
                                                    np.concatenate([c, c[:1]]) for c in cams],
                        scores=[np.resize(s, len(classes)) for s in scores], classes=classes)
        with pytest.raises(DataError) as exc:
            evaluate(NpzCamSource(bad, CLASSES), dataset)
        assert str(exc.value) == (f"{bad / 'img000.npz'}: its classes do not match the dataset's ({what}); the "
                                  "dataset's classes are disc, square, star: store one map per class under these "
                                  "names, in any order")
    np.savez(bad / "img000.npz", cams=np.zeros((2, H, W)), classes=np.array(CLASSES))
    with pytest.raises(DataError, match=r"img000\.npz: cams have shape \(2, 32, 40\), expected \(3, H, W\)"):
        NpzCamSource(bad, CLASSES).load("img000")


def test_npz_source_errors_name_the_file(scenes, tmp_path):
    dataset, cams, scores = make_scenes(n=3)
    bad = write_npz(tmp_path / "bad", dataset, cams, scores, classes=["disc", "star", "circle"])
    partial = write_npz(tmp_path / "partial", dataset, cams, scores)
    (partial / "img001.npz").unlink()
    with pytest.raises(FileNotFoundError, match="no CAM file for image 'img001'"):
        evaluate(NpzCamSource(partial, CLASSES), dataset)
    # unreadable files, missing arrays, maps of the wrong size and other class names: cells of
    # tests/test_hardening.py::test_every_command_x_every_bad_input (bench --cams)
    with pytest.raises(FileNotFoundError, match="CAM directory not found"):
        NpzCamSource(tmp_path / "nowhere", CLASSES)
    assert read_npz_classes(bad) == ["disc", "star", "circle"]


def test_npz_source_reads_wsl_cam_layout_and_path_ids(tmp_path):
    dataset, cams, scores = make_scenes(n=2)
    dataset.annotations[0].id = "sub/dir/img000"  # ids with path separators name files with "__"
    write_npz(tmp_path / "cam" / "cams", dataset, cams, scores)
    assert (tmp_path / "cam" / "cams" / "sub__dir__img000.npz").is_file()
    source = NpzCamSource(tmp_path / "cam", CLASSES)  # the `wsl cam --out` directory
    assert source.directory == tmp_path / "cam" / "cams"
    assert read_npz_classes(tmp_path / "cam") == CLASSES
    assert evaluate(source, dataset, metrics=["maxboxacc"], thresholds=THRESHOLDS)["num_images"] == 2


def test_any_iterable_of_pairs_is_a_source(scenes):
    dataset, cam_dir = scenes
    pairs = [NpzCamSource(cam_dir, CLASSES).load(a.id) for a in dataset.annotations]
    assert evaluate(pairs, dataset, metrics=["cls_map"]) == evaluate(NpzCamSource(cam_dir, CLASSES), dataset,
                                                                      metrics=["cls_map"])
    with pytest.raises(DataError, match="ended after 3 images"):
        evaluate(pairs[:3], dataset, metrics=["cls_map"])


def test_npz_without_scores_skips_classification_metrics(tmp_path, caplog):
    dataset, cams, _ = make_scenes(n=4)
    for a, c in zip(dataset.annotations, cams):
        np.savez_compressed(tmp_path / f"{a.id}.npz", cams=c, classes=np.array(CLASSES))
    metrics = evaluate(NpzCamSource(tmp_path, CLASSES), dataset, thresholds=THRESHOLDS)
    assert "cls_map" not in metrics and "top1_loc" not in metrics and "corloc" in metrics
    assert "without scores" in caplog.text


def test_compare_runs_side_by_side(bench_run, tmp_path):
    _, out = bench_run
    other = tmp_path / "other"
    other.mkdir()
    data = json.loads((out / "metrics.json").read_text())
    data["maxboxacc"] = 0.0
    (other / "metrics.json").write_text(json.dumps(data))
    table = compare_runs([out, other])
    lines = table.splitlines()
    assert lines[0] == f"| metric | {out.name} | other |"
    row = next(line for line in lines if line.startswith("| maxboxacc |"))
    assert row == f"| maxboxacc | **{100 * load_run(out)['maxboxacc']:.1f}** | 0.0 |"
    assert not any("per_class" in line for line in lines)
    with pytest.raises(FileNotFoundError, match="not a `wsl bench --out` directory"):
        compare_runs([tmp_path / "missing"])


def test_model_source_matches_the_extractor_and_scores(scenes):
    from wsl.cam.extract import CAMExtractor
    from wsl.models import build_classifier

    dataset, _ = scenes
    small = MemoryDataset(dataset.annotations[:4], dataset.masks[:4])
    torch.manual_seed(0)
    model = build_classifier(backbone="vgg_tiny", num_classes=3, pooling="max")
    source = ModelCamSource(model, small, batch_size=2, device="cpu")  # max-normalised, like `wsl cam`
    items = list(source.iter_cams(small))
    assert model.training  # run in eval mode, then given back as it was
    model.eval()
    img = torch.from_numpy(small.load_image(1)).permute(2, 0, 1)[None].float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    direct = CAMExtractor(model, normalize="max")((img - mean) / std)
    assert items[1][0].shape == (3, H, W)
    np.testing.assert_allclose(items[1][0], direct.cams[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(items[1][1], direct.scores[0].numpy(), rtol=1e-4, atol=1e-5)
    metrics = evaluate(source, small, thresholds=THRESHOLDS)
    assert math.isfinite(metrics["maxboxacc"]) and "cls_map" in metrics


def test_cli_bench_on_generated_scenes(scenes_root, tmp_path, capsys):
    from wsl.cli import main
    from wsl.data.spec import build_dataset
    from wsl.models import build_classifier, classifier_checkpoint
    from wsl.utils.io import save_checkpoint

    dataset = build_dataset(f"synth:{scenes_root}", "val", masks=True)
    cam_dir = tmp_path / "cams"
    cam_dir.mkdir()
    for i, ann in enumerate(dataset.annotations):
        mask = dataset.load_mask(i)
        cams = np.stack([cv2.GaussianBlur((mask == c + 1).astype(np.float32), (9, 9), 3)
                         for c in range(len(dataset.classes))])
        np.savez_compressed(cam_dir / f"{ann.id}.npz", cams=cams.astype(np.float16),
                            classes=np.array(dataset.classes), scores=cams.max(axis=(1, 2)))
    out = tmp_path / "run"
    argv = ["bench", "--data", f"synth:{scenes_root}", "--split", "val", "--cams", str(cam_dir), "--out", str(out),
            "--cam-interval", "0.01"]
    assert main(argv) == 0
    metrics = load_run(out)
    assert metrics["num_images"] == len(dataset) and metrics["pxap"] > 0.5
    assert metrics["protocol"] == "published"  # the default
    assert (out / "report.md").is_file() and (out / "config.json").is_file()
    exact = tmp_path / "exact"
    assert main(["bench", "--data", f"synth:{scenes_root}", "--split", "val", "--cams", str(cam_dir), "--out",
                 str(exact), "--cam-interval", "0.01", "--protocol", "wsl-exact", "--metrics", "pointing_game",
                 "maxboxacc"]) == 0
    assert load_run(exact)["protocol"] == "wsl-exact"
    assert json.loads((exact / "config.json").read_text())["settings"]["protocol"] == "wsl-exact"
    assert "- Protocol: `wsl-exact`" in (exact / "report.md").read_text()
    assert main(argv) == 1  # refuses to overwrite
    assert "pass --overwrite" in capsys.readouterr().err

    # a checkpoint scored directly, and through the files `wsl cam` exports from it: the same numbers
    torch.manual_seed(0)
    model = build_classifier(backbone="vgg_tiny", num_classes=len(dataset.classes), pooling="lse")
    save_checkpoint(tmp_path / "model.pt", classifier_checkpoint(model, dataset.classes))
    data = ["--data", f"synth:{scenes_root}", "--split", "val"]
    assert main(["cam", "--checkpoint", str(tmp_path / "model.pt"), *data, "--out", str(tmp_path / "cam"),
                 "--device", "cpu"]) == 0
    assert main(["bench", *data, "--cams", str(tmp_path / "cam"), "--out", str(tmp_path / "from_files"),
                 "--cam-interval", "0.01"]) == 0
    out2 = tmp_path / "from_model"
    assert main(["bench", *data, "--checkpoint", str(tmp_path / "model.pt"), "--out", str(out2), "--cam-interval",
                 "0.01", "--device", "cpu", "--compare", str(out), str(tmp_path / "from_files")]) == 0
    direct, exported = load_run(out2), load_run(tmp_path / "from_files")
    for key in ("cls_map", "point_map", "pointing_game", "maxboxacc", "maxboxaccv2", "pxap"):
        assert direct[key] == pytest.approx(exported[key], abs=0.02), key  # float16 files
    compare = (out2 / "compare.md").read_text()
    assert f"| metric | {out2.name} | {out.name} | from_files |" in compare and "| maxboxacc |" in compare


def test_metric_registry_names():
    assert {"cls_map", "point_map", "pointing_game", "corloc", "maxboxacc", "top1_loc", "pxap",
            "pseudo_mask_miou"} == set(METRICS.names())
