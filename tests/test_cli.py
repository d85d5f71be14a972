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
