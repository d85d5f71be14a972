"""The command line's help: plain text (no Sphinx markup from the docstrings it reuses) and a default
for every option that has one."""
from __future__ import annotations

import argparse

import pytest

from wsl import cli


def _subparsers(parser: argparse.ArgumentParser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("name", sorted(_subparsers(cli.build_parser())))
def test_help_is_plain_text_and_shows_every_default(name):
    sub = _subparsers(cli.build_parser())[name]
    text = sub.format_help()
    for markup in ("``", ":func:", ":class:", ":mod:", ":meth:", ":data:"):
        assert markup not in text, f"wsl {name} --help shows {markup!r}"
    for action in sub._actions:
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS, [], ""):
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        shown = sub._get_formatter()._expand_help(action) if action.help else ""
        assert "default" in shown, f"wsl {name} {action.option_strings[0]}: default {action.default!r} not shown"


def test_plain_text_strips_roles_and_literals():
    assert cli.plain_text("see :func:`~wsl.segment.segment_dataset` and ``--out``") == "see segment_dataset and --out"
    assert cli.plain_text(":class:`wsl.cam.crf.DenseCRF`") == "wsl.cam.crf.DenseCRF"


@pytest.fixture(scope="module")
def checkpoints(scenes_root, tmp_path_factory):
    from wsl.data.spec import build_dataset
    from wsl.models import build_classifier, build_segmenter, classifier_checkpoint, segmenter_checkpoint
    from wsl.utils.io import save_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    classes = build_dataset(f"voc:{scenes_root}", "val").classes
    save_checkpoint(d / "cam.pt", classifier_checkpoint(
        build_classifier(backbone="vgg_tiny", num_classes=len(classes), pooling="max"), classes))
    save_checkpoint(d / "segment.pt", segmenter_checkpoint(
        build_segmenter("deeplab_largefov", num_classes=len(classes) + 1, backbone="vgg_tiny"), classes,
        input_size=64))
    return d


@pytest.mark.parametrize("command", ["cam", "segment"])
def test_the_summary_is_printed_once(command, checkpoints, scenes_root, tmp_path):
    """What a user sees (a child process, the CLI's own logging set-up): one line names the output
    folder. `wsl cam` and `wsl segment` used to log the library's summary and then their own."""
    import subprocess
    import sys

    from conftest import CHILD_ENV

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "wsl", command, "--checkpoint", str(checkpoints / f"{command}.pt"),
                           "--data", f"voc:{scenes_root}", "--split", "val", "--device", "cpu", "--out", str(out)],
                          env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in (done.stdout + done.stderr).replace("\r", "\n").splitlines() if line.strip()]
    summaries = [line for line in lines if str(out) in line]
    assert len(summaries) == 1, lines
    assert "8 images" in summaries[0]


def test_data_help_lists_every_dataset_spec():
    from wsl.data.spec import SCHEMES

    subs = _subparsers(cli.build_parser())
    for name in ("train", "train-seg", "cam", "bench", "segment"):
        action = next(a for a in subs[name]._actions if "--data" in a.option_strings)
        shown = subs[name]._get_formatter()._expand_help(action)
        for scheme in SCHEMES:
            assert f"{scheme}:" in shown, f"wsl {name} --data's help omits {scheme}:"
        assert "tags:FILE" in shown and "tags:DIR" in shown


def test_synth_preset_help_states_each_presets_knobs():
    from wsl.data.synth import PRESETS, SynthConfig

    flags = {name: flag for name, flag, *_ in SynthConfig.knobs()}
    sub = _subparsers(cli.build_parser())["synth"]
    action = next(a for a in sub._actions if "--preset" in a.option_strings)
    shown = sub._get_formatter()._expand_help(action)
    for preset, knobs in PRESETS.items():
        assert f"{preset}: " in shown
        for name, value in knobs.items():
            assert f"{flags[name]} {value}" in shown, (preset, name)
