"""Inference jobs under ``torchrun``: ``wsl cam``, ``wsl segment``, ``wsl bench`` and the pipeline's
inference stages split the images between processes.

The contract (without a process group every helper here gives the one-process answer):

- every rank calls the library function with the same arguments. The work is planned from the whole
  dataset as an ordered list of *units* (a batch of images, or the batches of one tar shard) and rank
  ``r`` of ``W`` takes units ``r, r + W, r + 2W, ...`` (:func:`part`): no image twice, none left out,
  and every unit computed exactly as one process computes it, so the files are the same whatever ``W``;
- rank 0 alone prepares the output directory (:func:`prepared_output`), holding a lock on it
  (``flock``) until the job ends, so a second run into the same directory is refused; the other ranks
  wait. When rank 0 refuses (not empty, other settings, locked) every rank stops with its message,
  which only rank 0 prints (:class:`EchoedError`);
- each rank writes its own units' files; :func:`gather` after the work is the barrier after which rank
  0 writes the manifest (with the world size and what each rank did: :func:`ranks_record`);
- a lost process ends the job with one line (:class:`JobError`). ``torchrun`` stops the other
  processes of the job with SIGTERM as soon as one dies (within its 0.1 s monitor interval); inside
  :func:`job` that signal raises the error, so the file being written is removed, never left
  half-written. Without torchrun's agent (another launcher, another node), gloo reports the closed
  connection at the next collective at once; a process that hangs, or one lost with NCCL, is reported
  when the collective times out after :data:`TIMEOUT_S` seconds.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, TypeVar

import torch.distributed as tdist

from wsl.errors import OutputExistsError, WSLError
from wsl.utils import dist
from wsl.utils.io import PathLike

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds a collective waits for the other processes before the job ends (the process group's timeout).
TIMEOUT_S = 1800.0


class JobError(WSLError, RuntimeError):
    """A process of the job was lost, or the job was stopped: one line saying so and what to do."""

    #: True when the message is rank 0's, repeated on another rank: the CLI prints it on rank 0 only.
    echoed = False


class EchoedError(JobError):
    """Rank 0 refused the job (its error message, repeated on the other ranks)."""

    echoed = True


def _hint(resumable: bool) -> str:
    return ("every file finished so far is complete: rerun with --resume to finish" if resumable
            else "rerun the command")


def _short(error: BaseException) -> str:
    """The first sentence of a torch.distributed error without its source location."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../gloo/transport/tcp/pair.cc:561] "
    return text.split(". ")[0].rstrip(".")


class _Job:
    resumable = True


_JOB = _Job()


@contextlib.contextmanager
def job(device: str = "auto", *, resumable: bool = True) -> Iterator[dist.DistInfo]:
    """Join the process group ``torchrun`` announces (if any; left again at the end when this call
    joined it) and pick this rank's device; while the block runs, SIGTERM (how torchrun stops the job
    when another process dies) raises :class:`JobError`. ``resumable``: whether the command finishes
    an interrupted run with ``--resume`` (said in the error lines)."""
    created = not dist.is_initialized()
    info = dist.init_distributed(device, timeout_s=TIMEOUT_S)
    previous_handler, previous_resumable = None, _JOB.resumable
    _JOB.resumable = resumable
    main_thread = threading.current_thread() is threading.main_thread()

    def stop(signum: int, frame: Any) -> None:
        raise JobError(f"stopped by SIGTERM (torchrun stops every process of the job when one of them fails "
                       f"or is interrupted: see the other processes' messages); {_hint(resumable)}")

    if main_thread:
        previous_handler = signal.signal(signal.SIGTERM, stop)
    lost = False
    try:
        yield info
        if created and info.distributed:
            # every rank leaves together: one that leaves the group while a peer still works in it can
            # make gloo abort the peer (SIGABRT) instead of letting it finish
            barrier("waiting for the other processes to finish")
    except JobError:
        lost = True  # leaving a group whose peer is gone can block or abort: the process ends anyway
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)
        _JOB.resumable = previous_resumable
        if created and not lost:
            dist.cleanup()


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError, DistNetworkError, timeouts) are RuntimeErrors
        if isinstance(e, WSLError):
            raise
        reason = _short(e)
        timed_out = "timed out" in str(e).lower() or "timeout" in str(e).lower()
        why = (f"no answer from another process within {TIMEOUT_S:.0f} s" if timed_out
               else "another process of the job stopped")
        raise JobError(f"rank {dist.get_rank()} of {dist.get_world_size()}: {why} ({what}: {reason}); its own "
                       f"message says why; {_hint(_JOB.resumable)}") from e


def barrier(what: str = "barrier") -> None:
    if dist.is_initialized():
        with _collective(what):
            tdist.barrier()


def gather(obj: Any, what: str = "gathering the results") -> List[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in one process); also a barrier."""
    with _collective(what):
        return dist.all_gather_object(obj)


def broadcast(obj: Any, what: str = "broadcast") -> Any:
    """Rank 0's ``obj`` on every rank."""
    with _collective(what):
        return dist.broadcast_object(obj)


def part(units: Sequence[T]) -> List[T]:
    """This rank's units: ``units[rank::world_size]`` (all of them in one process)."""
    return list(units[dist.get_rank()::dist.get_world_size()]) if dist.is_initialized() else list(units)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and hand its result to every rank; an error there is raised on rank 0 as it
    is and on the other ranks as :class:`EchoedError` with the same message."""
    if not dist.is_initialized():
        return fn()
    result, error, message = None, None, None
    if dist.is_main():
        try:
            result = fn()
        except Exception as e:  # every rank must hear of it before anyone raises
            error, message = e, str(e).strip() or type(e).__name__
    result, message = broadcast((result, message), "waiting for rank 0 to prepare the output")
    if error is not None:
        raise error
    if message is not None:
        raise EchoedError(message)
    return result


class OutputLock:
    """An exclusive ``flock`` on an output directory, taken by rank 0 for the whole job: a second run
    into the same directory (its rank 0) is refused while the first one runs. The lock goes with the
    process, so a killed run never leaves a stale lock. File systems without ``flock`` (some network
    mounts) get a warning and no lock."""

    def __init__(self, path: PathLike, kind: str) -> None:
        self.path, self.kind, self.fd = Path(path), kind, None

    def acquire(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(f"output path exists and is not a directory: {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputExistsError(f"{self.path} is being written by another running `wsl {self.kind}` (or another "
                                    "command); two runs cannot share an output directory: wait for it to end, or "
                                    "choose another --out") from None
        except OSError as e:
            log.warning("cannot lock %s (%s): a second run into it would not be noticed", self.path, e.strerror)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


@contextlib.contextmanager
def prepared_output(path: PathLike, kind: str, prepare: Callable[[], T]) -> Iterator[T]:
    """Rank 0 locks ``path`` (:class:`OutputLock`) and runs ``prepare`` (e.g. ``prepare_output_dir``);
    every rank gets its result (or its error, :func:`on_main`). The lock is held until the block ends."""
    lock = OutputLock(path, kind)

    def locked() -> T:
        lock.acquire()
        return prepare()

    try:
        yield on_main(locked)
    finally:
        lock.release()


def ranks_record(stats: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The manifest's ``distributed`` entry from every rank's ``stats`` (:func:`gather`): the world size
    and, per rank, what it did in this call (e.g. images computed, units, seconds)."""
    return {"world_size": len(stats), "ranks": [{"rank": r, **s} for r, s in enumerate(stats)]}


def main_only() -> bool:
    """Whether this process writes the job's shared files (rank 0)."""
    return dist.is_main()


def rank_suffix() -> str:
    """`` (rank R of W)`` in a multi-process job, else empty: for log lines every rank writes."""
    return f" (rank {dist.get_rank()} of {dist.get_world_size()})" if dist.is_initialized() else ""


__all__ = ["TIMEOUT_S", "JobError", "EchoedError", "job", "barrier", "gather", "broadcast", "part", "on_main",
           "OutputLock", "prepared_output", "ranks_record", "main_only", "rank_suffix"]
