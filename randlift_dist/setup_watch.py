"""Set-up never waits silently: a watchdog thread over the trainer's set-up phases.

`SetupWatch(...).start()` runs a daemon thread while the process group is formed and the trainer
is built (`phase(...)` names the current phase, `stop()` ends the watch when training starts).
Once a second it looks at where the main thread is (`sys._current_frames`) and whether this
process is using CPU:

- **DeepSpeed's JIT build lock.** torch's extension loader (`torch.utils.file_baton.FileBaton`)
  creates `<extensions dir>/<op>/lock` with O_EXCL before it builds or loads a JIT-built op, and
  every other process loading that op waits while the file exists, forever and without output;
  the file holds no process id, and a process killed while it holds it (SIGKILL, a node lost)
  leaves it behind. While the main thread waits in `FileBaton.wait`, the lock is judged
  **stale** when (1) no process of this machine has its working directory in the op's build
  directory (a live build runs ninja and the compiler there), (2) the lock file is at least
  `JIT_LOCK_GRACE_S` old and (3) nothing else in that directory changed for that long. Ages are
  measured on the file system's own clock (the mtime of a probe file written beside the lock), so
  nodes sharing a home directory with skewed clocks agree. A stale lock ends the process with one
  line naming the file and `rm <file>` as the fix, and status 2 (the machine needs a fix that a
  restart would not make). A live build on another node sharing the directory that writes nothing
  for `JIT_LOCK_GRACE_S` is the one case this rule calls stale by mistake. Only local rank 0 judges
  (every rank of a node loads DeepSpeed's ops at the same point, so it waits on the same lock):
  the line is said once per node, and the other local ranks are stopped by the launcher. A lock
  that a live build holds is named after `LOCK_NOTICE_S` of waiting, and a wait on it that passes
  `timeout_s` ends like any other wait (below).
- **Any other wait.** When the process has been idle (under 10 % of one core in every poll) for
  `notice_s` within one phase, one line says which phase and where the main thread waits (file,
  line and function of the innermost frames of this package and below it). When it has been idle
  for `timeout_s` (`parallel.setup_timeout_s`), one line says so and the process ends with status
  1 (a restart may cure it). A phase that computes (sampling a big lift) is never ended by the
  watch; a compiler run by this process counts as a wait (its CPU time is the child's).

Who prints: local rank 0 of each node prints the notices; the final line follows `say(...)`,
given by the entry point (rank 0's message also goes to `exit_status.json`). Nothing here
imports deepspeed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

JIT_LOCK_GRACE_S = 30.0  # a lock this old, in a directory unchanged this long, with no local build: stale
LOCK_NOTICE_S = 5.0      # say what we wait for after this long in FileBaton.wait
EXIT_ERROR, EXIT_INPUT = 1, 2


def _builders_in(directory: Path) -> list[int]:
    """Pids of this machine's processes (the ones we may inspect) working in `directory`."""
    found, target = [], str(directory.resolve())
    for p in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(p / "cwd")
        except OSError:
            continue
        if cwd == target or cwd.startswith(target + os.sep):
            found.append(int(p.name))
    return found


def _fs_now(directory: Path) -> float:
    """The file system's current time: the mtime of a probe file written in `directory`."""
    probe = directory / f".randlift-clock-{os.getpid()}-{threading.get_ident()}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def stale_lock_reason(lock: Path, grace_s: float = JIT_LOCK_GRACE_S) -> str | None:
    """Why `lock` (a FileBaton lock file) is stale, or None while it may belong to a live build."""
    op_dir = lock.parent
    try:
        made = lock.stat().st_mtime
    except OSError:
        return None  # released meanwhile
    if _builders_in(op_dir):
        return None
    now = _fs_now(op_dir)
    if now - made < grace_s:
        return None
    try:
        latest = max((f.stat().st_mtime for f in op_dir.rglob("*")
                      if f.name != "lock" and not f.name.startswith(".randlift-clock-")), default=made)
    except OSError:
        return None  # files appearing and going: a build is running
    if now - latest < grace_s:
        return None
    return (f"{now - made:.0f} s old, no build of {op_dir.name} runs on this machine and nothing in "
            f"{op_dir} changed for {now - max(latest, made):.0f} s")


def _main_stack() -> list[traceback.FrameSummary]:
    frame = sys._current_frames().get(threading.main_thread().ident)
    return traceback.extract_stack(frame) if frame is not None else []


def _baton_lock() -> Path | None:
    """The lock file the main thread waits on in FileBaton.wait, if it does."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("file_baton.py"):
            path = getattr(frame.f_locals.get("self"), "lock_file_path", None)
            return Path(path) if path else None
        frame = frame.f_back
    return None


def where(stack: list[traceback.FrameSummary]) -> str:
    """Where the main thread waits: the innermost frame of this package, the innermost frame of an
    installed library below it (torch, deepspeed: e.g. a JIT build's ninja run) and the innermost
    frame of all (a `subprocess` or `threading` wait), each once."""
    def last(pred):
        return max((i for i, f in enumerate(stack) if pred(f.filename)), default=None)

    ours = last(lambda f: f"{os.sep}randlift_dist{os.sep}" in f)
    lib = last(lambda f: "site-packages" in f and f"{os.sep}randlift_dist{os.sep}" not in f)
    picks = sorted({i for i in (ours, lib, len(stack) - 1 if stack else None) if i is not None})
    parts = []
    for i in picks:
        f = stack[i]
        name = f.filename.split(f"site-packages{os.sep}")[-1].split(f"{os.sep}randlift_dist{os.sep}")[-1]
        name = name if name != f.filename else os.path.basename(name)  # the standard library: its file name
        parts.append(f"{name}:{f.lineno} ({f.name})")
    return " -> ".join(parts) or "unknown"


class SetupWatch:
    """Watch the set-up phases of one process; see the module docstring."""

    def __init__(self, timeout_s: float, rank: int, local_rank: int, say: Callable[[int, str], None],
                 notice_s: float | None = None, poll_s: float = 1.0):
        self.timeout_s, self.rank, self.local_rank, self.say = float(timeout_s), rank, local_rank, say
        self.notice_s = float(notice_s) if notice_s is not None else min(60.0, max(5.0, timeout_s / 10))
        self.poll_s = poll_s
        self._phase, self._since = "set-up", time.monotonic()
        self._noticed: set[tuple[str, str]] = set()
        self._locks: dict[str, float] = {}  # lock file -> when the main thread was first seen waiting on it
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="randlift-setup-watch", daemon=True)

    def start(self) -> "SetupWatch":
        self._thread.start()
        return self

    def phase(self, name: str) -> None:
        """Enter the set-up phase `name` (its clock starts now)."""
        self._phase, self._since = name, time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def _notice(self, text: str) -> None:
        if self.local_rank == 0:
            print(f"randlift-train: rank {self.rank}: {text}", file=sys.stderr, flush=True)

    def _end(self, code: int, text: str) -> None:
        if self._done.is_set():
            return
        self.say(code, text)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _run(self) -> None:
        cpu, idle_since, seen = time.process_time(), None, None
        while not self._done.wait(self.poll_s):
            now, used = time.monotonic(), time.process_time()
            busy, cpu = used - cpu >= 0.1 * self.poll_s, used
            if seen != (self._phase, self._since) or busy:  # a new phase, or CPU work: not waiting
                seen, idle_since = (self._phase, self._since), (None if busy else now)
            elif idle_since is None:
                idle_since = now
            phase, lock = self._phase, _baton_lock()
            waited = 0.0 if idle_since is None else now - idle_since
            if lock is not None:
                since = self._locks.setdefault(str(lock), now)
                reason = stale_lock_reason(lock) if self.local_rank == 0 else None
                if reason is not None:
                    self._end(EXIT_INPUT, f"stale JIT build lock {lock} ({reason}): a build of this op was "
                                          f"killed while holding it; remove it (rm {lock}) and start again")
                if now - since >= LOCK_NOTICE_S and ("lock", str(lock)) not in self._noticed:
                    self._noticed.add(("lock", str(lock)))
                    who = _builders_in(lock.parent)
                    self._notice(f"{phase}: waiting for the JIT build lock {lock} "
                                 + (f"(a build runs on this machine: pid {', '.join(map(str, who))})" if who else
                                    f"(no build of it runs on this machine: it is called stale when "
                                    f"{JIT_LOCK_GRACE_S:.0f} s old)"))
                if waited < self.timeout_s:  # said above; a lock held past the timeout ends below
                    continue
            if waited < self.notice_s:
                continue
            at = where(_main_stack())
            if waited >= self.timeout_s:
                self._end(EXIT_ERROR, f"{phase} waited {waited:.0f} s in {at} without progress "
                                      f"(parallel.setup_timeout_s={self.timeout_s:g}): stopping; a peer that "
                                      "never arrived, a lock or a file system that does not answer")
            if (phase, at) not in self._noticed:
                self._noticed.add((phase, at))
                self._notice(f"{phase}: waiting for {waited:.0f} s in {at} (parallel.setup_timeout_s="
                             f"{self.timeout_s:g} ends the wait)")
