"""Tar shards (wsl.utils.shards): written whole or not at all, reproducibly, in the webdataset layout; a
`wsl cam --shards` output is read by `wsl bench --cams` and `wsl train-seg --masks` with the same numbers
as the one-file-per-image output, and by the webdataset package itself."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from wsl.cam.files import load_cam_npz
from wsl.bench import NpzCamSource, ShardCamSource, cam_files_source, evaluate, read_npz_classes
from wsl.cam.export import export_cams
from wsl.data.spec import build_dataset
from wsl.errors import DataError
from wsl.models import build_classifier
from wsl.train.segmenter import PseudoMaskDataset
from wsl.utils.io import read_jsonl
from wsl.utils.shards import ShardIndex, ShardWriter, iter_shard, plan_shards, shard_key, shard_paths

pytestmark = pytest.mark.usefixtures("one_thread")


def test_writer_groups_an_images_members_and_index_reads_them_back(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with ShardWriter(path) as w:
        w.add("a", {"cams.npz": b"1" * 700, "json": b"{}"})
        w.add(shard_key("b.c%d"), {"mask.png": b"\x89PNG"})
    assert shard_key("b.c%d") == "b%2Ec%25d"
    assert list(iter_shard(path)) == [("a", {"cams.npz": b"1" * 700, "json": b"{}"}),
                                      ("b%2Ec%25d", {"mask.png": b"\x89PNG"})]
    index = ShardIndex([path])
    assert index.read("a", "json") == b"{}" and index.read("b%2Ec%25d", "mask.png") == b"\x89PNG"
    assert ("a", "mask.png") not in index
    with pytest.raises(ValueError, match="without '.'"):
        with ShardWriter(tmp_path / "x.tar") as w:
            w.add("a.b", {"json": b"{}"})
    # same content, same bytes (fixed times and owners), and a failed shard leaves nothing behind
    with ShardWriter(tmp_path / "again.tar") as w:
        w.add("a", {"cams.npz": b"1" * 700, "json": b"{}"})
        w.add("b%2Ec%25d", {"mask.png": b"\x89PNG"})
    assert (tmp_path / "again.tar").read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.tar", "shard-000000.tar"]
    assert shard_paths(tmp_path) == [tmp_path / "shard-000000.tar"]  # the pattern, no temporaries


def test_plan_keeps_whole_batches():
    batches = [[0, 1], [2, 3], [4], [5, 6], [7]]
    assert plan_shards(batches, 3) == [[[0, 1], [2, 3]], [[4], [5, 6]], [[7]]]
    assert plan_shards(batches, 100) == [batches]
    with pytest.raises(ValueError, match=">= 1"):
        plan_shards(batches, 0)


@pytest.fixture(scope="module")
def exports(scenes_root, tmp_path_factory):
    """The train split exported twice by one model: one file per image, and in shards of 5 images."""
    out = tmp_path_factory.mktemp("exports")
    train = build_dataset(f"voc:{scenes_root}", "train")
    torch.manual_seed(0)
    model = build_classifier(backbone="vgg_tiny", num_classes=len(train.classes), pooling="lse")
    kw = dict(batch_size=2, progress=False)
    export_cams(model, train.classes, train, out / "files", **kw)
    manifest = export_cams(model, train.classes, train, out / "sharded", shards=5, **kw)
    return out, manifest


def test_sharded_export_holds_the_per_file_bytes(exports, scenes_root):
    out, manifest = exports
    files, sharded = out / "files", out / "sharded"
    shards = shard_paths(sharded)
    # batches of 2 images, so shards of 6 (the first batch count reaching 5), 6 and 4
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [len(list(iter_shard(p))) for p in shards] == [6, 6, 4]
    assert manifest["shards"] == {"images_per_shard": 5, "count": 3} and not (sharded / "cams").exists()
    members = {key: files_ for p in shards for key, files_ in iter_shard(p)}
    ids = [a.id for a in build_dataset(f"voc:{scenes_root}", "train").annotations]
    assert sorted(members) == sorted(shard_key(i) for i in ids)
    for i in ids:
        m = members[shard_key(i)]
        assert m["cams.npz"] == (files / "cams" / f"{i}.npz").read_bytes()
        assert m["mask.png"] == (files / "masks" / f"{i}.png").read_bytes()
        assert m["overlay.png"] == (files / "overlays" / f"{i}.png").read_bytes()
        assert json.loads(m["json"]) == json.loads((files / "records" / f"{i}.json").read_text())
    for name in ("localization.json", "boxes_coco.json"):  # assembled from the shards' records
        assert (sharded / name).read_bytes() == (files / name).read_bytes()


def test_bench_reads_shards_with_the_per_file_numbers(exports, scenes_root):
    out, _ = exports
    assert read_npz_classes(out / "sharded") == read_npz_classes(out / "files")
    train = build_dataset(f"voc:{scenes_root}", "train", classes=read_npz_classes(out / "sharded"))
    source = cam_files_source(out / "sharded", train.classes)
    assert isinstance(source, ShardCamSource) and isinstance(cam_files_source(out / "files", train.classes), NpzCamSource)
    kw = dict(thresholds=np.arange(0, 1, 0.01))
    want = evaluate(NpzCamSource(out / "files", train.classes), train, **kw)
    got = evaluate(source, train, **kw)
    assert got == want and want["maxboxacc"] == want["maxboxacc"]  # every metric, exactly (and not NaN)
    cams, scores = source.load(train.annotations[3].id)  # random access too
    assert np.array_equal(cams, NpzCamSource(out / "files", train.classes).load(train.annotations[3].id)[0])
    with pytest.raises(FileNotFoundError, match="no CAMs for image 'nope'"):
        source.load("nope")


def test_train_seg_reads_shards_with_the_per_file_numbers(exports, scenes_root, tmp_path):
    from test_train_segmenter import tiny_config
    from wsl.train.segmenter import train_segmenter

    out, _ = exports
    base = build_dataset(f"voc:{scenes_root}", "train")
    per_file, sharded = PseudoMaskDataset(base, out / "files"), PseudoMaskDataset(base, out / "sharded")
    assert sharded.shards is not None and per_file.shards is None
    for i in range(len(base)):
        assert torch.equal(sharded[i]["mask"], per_file[i]["mask"])
    runs = {}
    for name in ("files", "sharded"):
        cfg = tiny_config(scenes_root, **{"data.masks": str(out / name), "schedule.epochs": 1})
        train_segmenter(cfg, tmp_path / name)
        runs[name] = [{k: v for k, v in r.items() if "second" not in k and k != "img_per_s"}
                      for r in read_jsonl(tmp_path / name / "metrics.jsonl")]
    assert runs["sharded"] == runs["files"] and runs["files"][0]["train_loss"] > 0


def test_a_missing_shard_member_is_named(exports, scenes_root, tmp_path):
    import shutil

    out, _ = exports
    broken = tmp_path / "broken"
    shutil.copytree(out / "sharded", broken)
    shard_paths(broken)[1].unlink()
    base = build_dataset(f"voc:{scenes_root}", "train")
    with pytest.raises(FileNotFoundError, match=r"no pseudo-mask for image 'train_000006' in the shards"):
        PseudoMaskDataset(base, broken)
    with pytest.raises(DataError, match="has no CAMs for image 'train_000006'"):
        evaluate(ShardCamSource(broken, base.classes), base, thresholds=np.arange(0, 1, 0.1))


def test_a_shard_member_of_the_wrong_size_is_named_in_dataset_order_too(exports, scenes_root):
    from dataclasses import replace

    out, _ = exports
    base = build_dataset(f"voc:{scenes_root}", "train")
    first = base.annotations[0]
    h, w = first.size
    base.annotations[0] = replace(first, size=(h + 1, w))  # the image "grew": its CAMs no longer fit
    source = ShardCamSource(out / "sharded", base.classes)
    for items in (source.iter_cams(base), (item for _, item in source.iter_part(base))):
        with pytest.raises(DataError, match=rf"shard-000000.tar:{first.id}.cams.npz: cams are {h}x{w} but image"):
            next(iter(items))


def test_webdataset_reads_the_shards(exports):
    wds = pytest.importorskip("webdataset")
    out, _ = exports
    urls = [str(p) for p in shard_paths(out / "sharded")]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        assert {"cams.npz", "mask.png", "overlay.png", "json"} <= set(sample)
        with np.load(io.BytesIO(sample["cams.npz"])) as z:
            assert z["used_cams"].dtype == np.float16 and str(z["format"]) == "wsl-cams/2"
        assert load_cam_npz("member", sample["cams.npz"])[0].shape[0] == len(load_cam_npz("member", sample["cams.npz"])[1])
        record = json.loads(sample["json"])
        assert shard_key(record["localization"]["file"]) == sample["__key__"]
        seen.append(sample["__key__"])
    assert len(seen) == len(set(seen)) == 16
