"""What keeps a long run alive: preemption signals, non-finite updates, an unusable workdir.

- `PreemptionGuard`: SIGTERM/SIGINT set a flag; the loop finishes the current step, writes a
  checkpoint and returns normally (exit 0); the next start resumes. A second signal while
  saving is ignored rather than killing the write.
- Non-finite loss/gradients never reach the parameters: the train step drops such an update
  on device (steps.py) and counts it. `NonFinitePolicy` decides, at the next log step, what
  happens then: 'skip' (continue), 'rollback' (restore the last checkpoint, scale the LR by
  train.rollback_lr_factor, keep reading fresh data) or 'halt' (stop, naming the step range).
- `check_workdir`: an unwritable or impossible --workdir (or train.compile_cache_dir) fails
  before any work is done.
- `WorkdirLock`: one run at a time in a workdir (the same command started twice would interleave
  two runs' checkpoints and metrics).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


class WorkdirError(OSError):
    pass


POLICIES = ("skip", "rollback", "halt")


def check_workdir(workdir: str, what: str = "--workdir") -> None:
    """Create the directory and prove it is writable (a probe file), or raise naming it as `what`
    (also used for train.compile_cache_dir). A URL (gs://...) is refused: the run's own files (tokenizer,
    metrics, TensorBoard, the reference log-prob cache) are written through the local filesystem, so they would
    land in a local directory named 'gs:' on each host while Orbax wrote the checkpoints to the bucket."""
    if "://" in workdir:
        raise WorkdirError(errno.EINVAL, f"{what}={workdir!r} is a URL: a run writes its files through the local "
                                         f"filesystem, so give a path every host sees, e.g. the bucket mounted "
                                         f"with gcsfuse (/mnt/BUCKET/...) or a shared NFS/Filestore directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe.{os.getpid()}")  # several hosts may probe one workdir
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise WorkdirError(e.errno, f"{what} {workdir!r} is not a writable directory: {reason}") from e


class WorkdirLock:
    """An exclusive lock on the workdir for a run's lifetime: a second run started in it (the same command in
    another terminal, a requeued job while the old one still runs, a notebook cell run twice) is refused
    instead of writing its checkpoints and metrics between the first one's. The lock is flock(2) on the
    directory itself: no file is written, and the kernel drops it when the process ends (a kill -9 leaves
    nothing stale). Only process 0 of a multi-host run takes it (`enabled`); a filesystem without flock
    (some network or FUSE mounts) logs a warning and the run goes on unlocked."""

    def __init__(self, workdir: str, enabled: bool = True):
        self._fd = None
        if not enabled:
            return
        fd = os.open(workdir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirError(errno.EBUSY, f"--workdir {workdir!r} is in use by another run (a process holds its "
                                            f"lock): wait for it to end or stop it; two runs in one workdir would "
                                            f"interleave their checkpoints and metrics") from None
        except OSError as e:
            os.close(fd)
            log.warning("--workdir %r cannot be locked (%s): nothing stops a second run in it", workdir, e)
            return
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


class PreemptionGuard:
    """Context manager: records SIGTERM/SIGINT instead of dying (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if self.received is None:
            self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


class NonFinitePolicy:
    """Tracks the device-side count of dropped (non-finite) updates and applies the policy."""

    def __init__(self, policy: str, max_events: int, start_step: int, seen: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"train.on_nonfinite={policy!r}: expected one of {POLICIES}")
        self.policy, self.max_events = policy, max_events
        self.seen, self.last_ok_step = seen, start_step

    def check(self, step: int, total_dropped: int, last_bad_step: int) -> str:
        """-> 'ok', 'skip' or 'rollback'; raises NonFiniteLossError for 'halt' or too many."""
        new = total_dropped - self.seen
        if new <= 0:
            self.last_ok_step = step
            return "ok"
        self.seen = total_dropped
        where = (f"loss or gradient became non-finite within steps [{self.last_ok_step + 1}, {step}] "
                 f"({new} update(s) dropped, last at step {last_bad_step})")
        if self.policy == "halt":
            raise NonFiniteLossError(f"{where}; halting (train.on_nonfinite='halt'). Checkpoints are intact; "
                                     f"lower optim.lr or check the data, then rerun to resume.")
        if total_dropped > self.max_events:
            raise NonFiniteLossError(f"{where}; {total_dropped} dropped updates in all exceed "
                                     f"train.max_nonfinite={self.max_events}. Checkpoints are intact.")
        self.last_ok_step = step
        return self.policy
