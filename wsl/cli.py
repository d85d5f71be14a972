"""The `wsl` command line: a thin layer over the importable API.

Each subcommand lives in ``wsl/commands/<name>.py`` and exposes ``add_parser(subparsers)`` (which sets
``func=run`` on its parser) and ``run(args) -> int``. This module only dispatches and turns user
errors into one line on stderr (the full traceback with ``--debug``).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys
import traceback
from typing import List, Optional

from wsl import __version__
from wsl.errors import WSLError

# Order is the order shown in --help.
COMMANDS = ["synth", "sbd", "train", "cam", "bench", "train_seg", "segment", "demo", "pipeline"]

# Exceptions that mean "the user gave us something wrong"; anything else is a bug and keeps its traceback.
USER_ERRORS = (WSLError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)


# OS errors that come from the machine's resources, not from a bug: one line too, saying what to do.
RESOURCE_ERRORS = {
    errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
    errno.EROFS: "choose an --out on a writable file system", errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions", errno.EMFILE: "raise the open-files limit (ulimit -n)",
    errno.ENAMETOOLONG: "use a shorter path", errno.EIO: "check the disk",
}
# Commands that finish an interrupted run with --resume.
RESUMABLE = ("train", "train-seg", "cam", "segment", "demo", "pipeline")


# Sphinx markup in the command modules' docstrings (which double as --help descriptions): shown plain.
_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|obj|exc):`~?([^`<]+?)(?:\s*<[^`]*>)?`")


def plain_text(text: str, code: str = "") -> str:
    """``:func:`~wsl.segment.segment_dataset``` -> ``segment_dataset``, double backticks dropped; ``code``
    goes around each role's name and literal instead (```` ` ```` for Markdown: the README's tables)."""
    text = _ROLE.sub(lambda m: code + (m.group(1).rsplit(".", 1)[-1] if m.group(0)[m.group(0).index("`") + 1] == "~"
                                       else m.group(1)) + code, text)
    return text.replace("``", code)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their paragraphs; every option that has a default says it (unless its help
    already does), so no --help leaves the user guessing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or action.option_strings == []
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        if not shown:
            return text
        return f"{text}{' ' if text else ''}(default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """Every wsl parser: plain-text help (:func:`plain_text`) with defaults (:class:`HelpFormatter`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        return plain_text(super().format_help())


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="wsl", description="Weakly-supervised localization from image-level tags.")
    parser.add_argument("--version", action="version", version=f"wsl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"wsl.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"wsl.commands.{name}":
                raise
            continue  # command not built yet
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one ``wsl`` command; its exit status. A process that joined a torchrun job's process group
    ends here with ``os._exit`` once stdout, stderr and the logs are flushed: at interpreter teardown
    gloo can abort a process whose work is done (see :func:`wsl.utils.dist.joined_a_group`)."""
    try:
        code = _main(argv)
    except BaseException as e:
        if not _joined_a_group():
            raise
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        else:
            traceback.print_exc()  # a bug (or --debug): its traceback, as without the job
            code = 1
    if _joined_a_group():
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    return code


def _joined_a_group() -> bool:
    dist = sys.modules.get("wsl.utils.dist")  # not imported: no group joined (keeps `wsl --help` light)
    return bool(dist is not None and dist.joined_a_group())


def _main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    if os.environ.get("RANK", "0") not in ("", "0") and not args.debug:
        level = max(level, logging.WARNING)  # under torchrun rank 0 tells the story once; others only warn
    logging.basicConfig(level=level, format="%(message)s" if not args.debug else
                        "%(asctime)s %(name)s %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("wsl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.errno in RESOURCE_ERRORS and not isinstance(e, WSLError):
            print(f"wsl {args.command}: error: {resource_line(e, args.command)}", file=sys.stderr)
            return 1
        if getattr(e, "echoed", False):
            return 1  # rank 0's error, repeated on this rank of a torchrun job: rank 0 prints it once
        if isinstance(e, USER_ERRORS):
            print(f"wsl {args.command}: error: {one_line(e)}", file=sys.stderr)
            return 1
        raise  # a bug: keep its traceback


def resource_line(error: OSError, command: str) -> str:
    """``PATH: No space left on device; free some space, then rerun with --resume (every file written so
    far is complete)``: what failed, where, and what to do."""
    where = f"{error.filename}: " if error.filename else ""
    what = error.strerror or os.strerror(error.errno)
    then = ", then rerun with --resume (every file written so far is complete)" if command in RESUMABLE else ""
    return f"{where}{what}; {RESOURCE_ERRORS[error.errno]}{then}"


def one_line(error: BaseException) -> str:
    """The first line of the error's message. An error raised in a DataLoader worker comes back
    re-raised with the worker's traceback as its message ("Caught DataError in DataLoader worker
    process 0. Original Traceback ..."): its last line is the original ``Type: message``, which is
    what names the bad file."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        name = type(error).__qualname__
        prefixes = (f"{type(error).__module__}.{name}:", f"{name}:")
        for line in reversed(lines):
            for prefix in prefixes:
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
        return lines[-1]
    return lines[0]
