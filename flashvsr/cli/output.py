"""Where ``flashvsr upscale`` writes, and the promise that nothing a user owns is lost.

- Every check on the destination runs before any weights load (``check_destination``).
- Frames go to a hidden sibling (``partial_path``) that takes the output's place only once the run
  has succeeded (``replace_with``). The only thing ever replaced is the exact file, or the folder of
  our own PNG frames, that the user named, and only with ``--overwrite``.
- A run that was killed (SIGKILL, power loss) cannot clean up after itself; the next run for the
  same output removes what it left, recognised by name and by a process id that no longer runs
  (``clean_stale``), and reports anything it cannot attribute.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FRAME_PATTERN = "frame_{:06d}.png"
_FRAME = re.compile(r"frame_\d{6,}\.png")


class OutputError(RuntimeError):
    """The output cannot be written where it was asked for; the message says what to do."""


def frame_name(index: int) -> str:
    return FRAME_PATTERN.format(index)


def partial_path(path: Path, pid: int | None = None) -> Path:
    """Hidden sibling written during the run; it takes ``path``'s place when complete."""
    return path.with_name(f".{path.stem}.partial-{pid or os.getpid()}{path.suffix}")


def _backup_path(path: Path) -> Path:
    """Where the previous frame folder waits while the new one moves in (folders cannot be swapped
    in one step)."""
    return path.with_name(f".{path.name}.replaced-{os.getpid()}")


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that are not frames this command writes."""
    return sorted(p.name for p in folder.iterdir() if not (p.is_file() and _FRAME.fullmatch(p.name)))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_destination(output: Path, input: Path, overwrite: bool) -> None:
    """Refuse, before anything loads, every output that would lose data or cannot be written."""
    out, src = output.resolve(), input.resolve()
    if _within(out, src):
        raise OutputError(f"{output} is {'the input itself' if out == src else 'inside the input'} "
                          f"{input}: choose an output outside it")
    if _within(src, out):
        raise OutputError(f"{output} contains the input {input}: choose another output")
    wants_folder = output.suffix == ""
    if output.exists() or output.is_symlink():
        if wants_folder and not output.is_dir():
            raise OutputError(f"{output} is a file, but a name without suffix means a folder of PNG "
                              "frames: choose another name, or add .mp4/.mkv/.mov/.webm for a video")
        if not wants_folder and output.is_dir():
            raise OutputError(f"{output} is a folder, but {output.suffix} means a video file: "
                              "choose another name")
        if wants_folder and (foreign := foreign_entries(output)):
            raise OutputError(f"{output} holds files this command did not write (e.g. "
                              f"{', '.join(foreign[:3])}): it only replaces a folder of its own "
                              "frame_NNNNNN.png files; choose a new or empty folder")
        if not overwrite and not (wants_folder and not any(output.iterdir())):
            raise OutputError(f"{output} exists: pass --overwrite to replace it")
    parent = output.parent
    if not parent.is_dir():
        raise OutputError(f"output folder does not exist: {parent} (create it first)")
    _check_writable(parent)


def _check_writable(folder: Path) -> None:
    # os.access says yes to root on a read-only mount; creating a file is the only real test.
    try:
        fd, probe = tempfile.mkstemp(prefix=".flashvsr-write-test-", dir=folder)
    except OSError as exc:
        why = "read-only" if exc.errno == errno.EROFS else (exc.strerror or str(exc))
        raise OutputError(f"cannot write to {folder} ({why}): choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)


def replace_with(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` onto ``path``; an existing frame folder is replaced only if it still
    holds nothing but our frames, and it is restored if the move fails."""
    if not (tmp.is_dir() and path.is_dir()):
        os.replace(tmp, path)                 # a file: one atomic step
        return
    foreign = foreign_entries(path)
    if foreign:
        raise OutputError(f"{path} now holds files this command did not write (e.g. "
                          f"{', '.join(foreign[:3])}); the new frames are not moved in")
    backup = _backup_path(path)
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(backup, path)
        raise
    _remove_frame_folder(backup)


def _remove_frame_folder(folder: Path) -> None:
    """Delete our frames in ``folder``, then the folder if that left it empty; nothing else."""
    for p in folder.iterdir():
        if p.is_file() and _FRAME.fullmatch(p.name):
            p.unlink()
    try:
        folder.rmdir()
    except OSError:
        log.warning("left %s in place: it holds files this command did not write", folder)


def discard(tmp: Path) -> None:
    """Remove this run's unfinished output."""
    if tmp.is_dir() and not tmp.is_symlink():
        _remove_frame_folder(tmp)
    else:
        tmp.unlink(missing_ok=True)


def _leftovers(path: Path) -> list[tuple[Path, int]]:
    """Hidden siblings of ``path`` that a run of this command made, with the id of that process."""
    names = re.compile(rf"\.{re.escape(path.stem)}\.partial-(\d+){re.escape(path.suffix)}"
                       rf"|\.{re.escape(path.name)}\.replaced-(\d+)")
    found = []
    if path.parent.is_dir():
        for p in path.parent.iterdir():
            m = names.fullmatch(p.name)
            if m:
                found.append((p, int(m.group(1) or m.group(2))))
    return sorted(found)


def _running(pid: int) -> bool | None:
    """Whether process ``pid`` exists; None where that cannot be asked safely (Windows' os.kill
    terminates)."""
    if sys.platform == "win32":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                   # exists, owned by someone else
        return True
    return True


def clean_stale(path: Path) -> None:
    """Remove what killed runs for ``path`` left behind; report what may still be in use."""
    for leftover, pid in _leftovers(path):
        if pid == os.getpid():
            continue
        state = _running(pid)
        if state is False:
            if leftover.name.endswith(f".replaced-{pid}") and not path.exists():
                # killed between the two renames of a folder swap: the previous output comes back
                os.rename(leftover, path)
                log.info("restored %s from an interrupted replace (process %d)", path, pid)
                continue
            discard(leftover)
            if leftover.exists() or leftover.is_symlink():
                log.warning("%s is left over from a killed run (process %d) but holds files this "
                            "command did not write: remove it by hand", leftover, pid)
            else:
                log.info("removed %s, left by a killed run (process %d)", leftover, pid)
        else:
            log.warning("%s belongs to %s: remove it by hand if no run is writing %s", leftover,
                        f"process {pid}, which is still running" if state else f"process {pid}",
                        path)
