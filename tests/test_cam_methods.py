"""wsl.cam.methods: CAM methods by name (ours, pytorch-grad-cam's, torchcam's), their contract, hooks, CLI."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from wsl.cam.files import load_cam_npz
from wsl.cam.extract import CAMExtractor, normalize_cams, upsample_cams
from wsl.cam.methods import (CAM_METHODS, EXTRA, build_cam_method, class_rounds, count_hooks, hooks_removed,
                             method_library)
from wsl.errors import MissingExtraError
from wsl.models import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")
PGC = ["gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "scorecam"]
TORCHCAM = ["torchcam:cam", "torchcam:gradcam", "torchcam:gradcam++", "torchcam:smoothgradcam++",
            "torchcam:xgradcam", "torchcam:layercam", "torchcam:scorecam"]
C = 4


def _model(pooling="lse", seed=0):
    torch.manual_seed(seed)
    return build_classifier(backbone="vgg_tiny", num_classes=C, pooling=pooling).eval()


def _images(n=3, h=40, w=48, seed=1):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _select(n=3):
    select = torch.zeros(n, C, dtype=torch.bool)
    select[0, [1, 3]] = True
    select[1, 0] = True  # image 2 selects nothing: all its maps stay zero
    return select


def test_registry_names_and_libraries():
    assert CAM_METHODS.names() == sorted(["cam", *PGC, *TORCHCAM])
    assert method_library("cam") == "wsl" and method_library("gradcam") == "pytorch-grad-cam"
    assert method_library("torchcam:gradcam") == "torchcam"
    with pytest.raises(ValueError, match=r"unknown CAM method 'gradcan'; known: cam, eigencam, gradcam"):
        build_cam_method("gradcan", _model())
    for name in CAM_METHODS.names():  # every entry cites its paper and states its formula
        doc = CAM_METHODS.get(name).__doc__
        assert "20" in doc and ("=" in doc or "sum" in doc), name


@pytest.mark.parametrize("name,module", [("gradcam", "pytorch_grad_cam"), ("torchcam:gradcam", "torchcam.methods")])
def test_missing_extra_is_one_line_naming_the_extra(name, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    with pytest.raises(MissingExtraError) as e:
        build_cam_method(name, _model())
    message = str(e.value)
    assert "\n" not in message and message.endswith(EXTRA) and EXTRA == "pip install 'wsl[bench]'"
    assert isinstance(e.value, ImportError)
    build_cam_method("cam", _model())  # ours needs no extra


def test_settings_that_do_not_apply_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="apply to --method cam only"):
        build_cam_method("gradcam", model, scales=(1.0, 0.5))
    with pytest.raises(ValueError, match="target_layer does not apply"):
        build_cam_method("cam", model, target_layer="backbone")
    pytest.importorskip("pytorch_grad_cam")
    with pytest.raises(ValueError, match=r"target layer 'backbone\.nope' is not a module .* backbone\.features"):
        build_cam_method("gradcam", model, target_layer="backbone.nope")
    with pytest.raises(ValueError, match=r"no option 'batch_size' \(its options: none\)"):
        build_cam_method("gradcam", model, batch_size=4)
    with pytest.raises(ValueError, match=r"select must be a bool \(N, C\) = \(3, 4\)"):
        build_cam_method("gradcam", model)(_images(), torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("name", ["gradcam", "torchcam:gradcam", "torchcam:scorecam"])
def test_maps_at_image_resolution_zero_for_unselected_classes(name):
    pytest.importorskip("pytorch_grad_cam" if ":" not in name else "torchcam")
    model, x = _model(), _images()
    select = _select()
    out = build_cam_method(name, model, **({"batch_size": 64} if "scorecam" in name else {}))(x, select)
    assert out.cams.shape == (3, C, 40, 48) and out.cams.dtype == torch.float32
    assert out.scores.shape == (3, C)
    with torch.no_grad():
        torch.testing.assert_close(out.scores, model(x), rtol=1e-4, atol=1e-5)
    assert (out.cams[~select] == 0).all()
    chosen = out.cams[select]
    assert chosen.amax((-2, -1)).gt(0.99).all() and chosen.min() >= 0  # max-normalised, non-trivial


def test_predicted_classes_when_no_selection_is_given():
    pytest.importorskip("torchcam")
    model, x = _model(), _images()
    out = build_cam_method("torchcam:gradcam", model)(x)
    from wsl.cam.extract import select_classes

    predicted = select_classes(scores=out.scores)
    assert (out.cams[~predicted] == 0).all() and (out.cams[predicted].amax((-2, -1)) > 0).all()


def test_the_two_libraries_agree_and_gradcam_of_gap_is_cam():
    """Same formula in both libraries -> the same maps (pytorch-grad-cam's cv2 resize matches our geometry
    for vgg_tiny at sides divisible by 8). With global average pooling, y_c = mean_ij(sum_k w_ck A_k + b_c),
    so Grad-CAM's weights are w_ck / hw and its map is ReLU(M_c - b_c) / hw (M_c: our class map); and
    torchcam's CAM is M_c - b_c."""
    pytest.importorskip("pytorch_grad_cam")
    pytest.importorskip("torchcam")
    model, x, select = _model("avg"), _images(h=48, w=64), _select()
    maps = {n: build_cam_method(n, model)(x, select).cams for n in ("gradcam", "torchcam:gradcam", "torchcam:cam",
                                                                    "layercam", "torchcam:layercam")}
    torch.testing.assert_close(maps["gradcam"], maps["torchcam:gradcam"], atol=2e-3, rtol=0)
    # pytorch-grad-cam hands its maps back min-max normalised; LayerCAM's are positive everywhere, so
    # they agree with torchcam's up to that (which wsl bench applies to every map anyway)
    torch.testing.assert_close(normalize_cams(maps["layercam"], "minmax"),
                               normalize_cams(maps["torchcam:layercam"], "minmax"), atol=2e-3, rtol=0)
    with torch.no_grad():
        low = torch.relu(model.class_maps(x) - model.head.bias.view(1, C, 1, 1))
    expected = normalize_cams(upsample_cams(low, (48, 64), stride=model.stride, offset=model.offset))
    torch.testing.assert_close(maps["torchcam:gradcam"][select], expected[select], atol=1e-4, rtol=0)
    # torchcam's CAM omits the head's bias: raw maps + b_c == our class maps
    raw = build_cam_method("torchcam:cam", model, normalize="none")(x, torch.ones(3, C, dtype=torch.bool)).cams
    ours = CAMExtractor(model, normalize="none")(x).cams
    torch.testing.assert_close(raw + model.head.bias.detach().view(1, C, 1, 1), ours, atol=1e-4, rtol=1e-4)


def test_class_rounds_cover_every_selected_pair():
    select = _select()
    rounds = class_rounds(select)
    assert rounds == [[1, 0, 0], [3, 0, 0]]
    covered = {(i, c) for r in rounds for i, c in enumerate(r) if select[i, c]}
    assert covered == {(0, 1), (0, 3), (1, 0)}


@pytest.mark.parametrize("name", ["gradcam", "eigencam", "torchcam:gradcam", "torchcam:smoothgradcam++",
                                  "torchcam:scorecam"])
def test_no_hook_is_left_after_success_or_an_exception(name, monkeypatch):
    pytest.importorskip("pytorch_grad_cam" if ":" not in name else "torchcam")
    model, x, select = _model(), _images(n=2, h=32, w=32), _select(2)
    model.train()  # pytorch-grad-cam calls model.eval(): the mode must come back
    before = count_hooks(model)
    method = build_cam_method(name, model)
    method(x, select)
    assert count_hooks(model) == before and model.training
    assert all(p.grad is None for p in model.parameters())  # pytorch-grad-cam's backward left no .grad

    calls = {"n": 0}
    forward = model.pooling.forward

    def failing(maps):  # the first call computes the scores; the next runs inside the hooked region
        calls["n"] += 1
        if calls["n"] > 1:
            assert count_hooks(model) > before  # the library's hooks are attached now
            raise IndexError("boom")  # pytorch-grad-cam's __exit__ would swallow an IndexError
        return forward(maps)

    monkeypatch.setattr(model.pooling, "forward", failing)
    with pytest.raises(IndexError, match="boom"):
        method(x, select)
    assert calls["n"] > 1 and count_hooks(model) == before and model.training


def test_hook_guard_removes_what_a_library_leaves_behind(caplog):
    model = _model()
    before = count_hooks(model)
    with hooks_removed(model):
        model.backbone.register_forward_hook(lambda *a: None)
        model.register_forward_pre_hook(lambda *a: None)
        model.head.weight.grad = torch.ones_like(model.head.weight)
        model.train()
    assert count_hooks(model) == before and not model.training and model.head.weight.grad is None
    assert "removed 2 hook(s)" in caplog.text


def test_cli_cam_and_bench_with_a_method_write_the_same_format(scenes_root, tmp_path, capsys):
    pytest.importorskip("pytorch_grad_cam")
    from wsl.bench import load_run
    from wsl.cli import main
    from wsl.data.spec import build_dataset
    from wsl.models import classifier_checkpoint
    from wsl.utils.io import save_checkpoint

    dataset = build_dataset(f"synth:{scenes_root}", "val")
    torch.manual_seed(0)
    model = build_classifier(backbone="vgg_tiny", num_classes=len(dataset.classes), pooling="avg")
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, classifier_checkpoint(model, dataset.classes))
    data = ["--data", f"synth:{scenes_root}", "--split", "val"]
    for method in ("cam", "gradcam"):
        assert main(["cam", "--checkpoint", str(ckpt), *data, "--out", str(tmp_path / method), "--device", "cpu",
                     "--method", method]) == 0
    assert json.loads((tmp_path / "gradcam" / "options.json").read_text())["options"]["method"] == "gradcam"
    for ann in dataset.annotations:
        # the same wsl-cams/2 layout; the library method has no raw pass maps (it computes the tagged
        # classes only), so its other classes read back as zero
        with np.load(tmp_path / "cam" / "cams" / f"{ann.id}.npz") as a, \
                np.load(tmp_path / "gradcam" / "cams" / f"{ann.id}.npz") as b:
            assert sorted(b.files) == ["classes", "format", "scores", "used_cams", "used_classes"]
            assert set(b.files) < set(a.files) and {"pass_maps_0", "geometry"} <= set(a.files)
            for key in b.files:
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        (ca, na, sa), (cb, nb, sb) = (load_cam_npz(tmp_path / m / "cams" / f"{ann.id}.npz") for m in ("cam", "gradcam"))
        assert na == nb and ca.shape == cb.shape
        np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-4)
        untagged = ann.labels < 0.5
        assert not cb[untagged].any() and (ca[untagged].any() or not untagged.any())

    bench = ["bench", *data, "--cam-interval", "0.01"]
    assert main([*bench, "--checkpoint", str(ckpt), "--method", "gradcam", "--device", "cpu",
                 "--out", str(tmp_path / "b_model")]) == 0
    assert main([*bench, "--cams", str(tmp_path / "gradcam"), "--out", str(tmp_path / "b_files"),
                 "--compare", str(tmp_path / "b_model")]) == 0
    direct, files = load_run(tmp_path / "b_model"), load_run(tmp_path / "b_files")
    assert direct["method"] == files["method"] == "gradcam"
    assert json.loads((tmp_path / "b_model" / "config.json").read_text())["method"] == "gradcam"
    for key in ("cls_map", "point_map", "pointing_game", "maxboxaccv2", "pxap"):
        assert direct[key] == pytest.approx(files[key], abs=0.02), key  # float16 files
    table = (tmp_path / "b_files" / "compare.md").read_text()
    assert "| method | gradcam | gradcam |" in table
    assert "- Method: `gradcam`" in (tmp_path / "b_model" / "report.md").read_text()

    capsys.readouterr()
    assert main([*bench, "--checkpoint", str(ckpt), "--method", "gradcam", "--rank-by", "map",
                 "--out", str(tmp_path / "b_rank")]) == 1
    assert "--rank-by map" in capsys.readouterr().err
    assert main([*bench, "--cams", str(tmp_path / "gradcam"), "--method", "gradcam", "--out", str(tmp_path / "x")]) == 1
    assert main(["cam", "--checkpoint", str(ckpt), *data, "--out", str(tmp_path / "y"), "--method", "gradcam",
                 "--flip"]) == 1
    err = capsys.readouterr().err
    assert "already hold theirs" in err and "apply to --method cam only" in err
