"""An alarm for the engine's thread: a CLOCK_MONOTONIC timerfd (libc, through ctypes) it polls, which
another thread sets to an earlier time with one system call, without waking it before that time.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os

CLOCK_MONOTONIC = 1  # time.monotonic's clock on Linux
TFD_NONBLOCK, TFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Alarm:
    """A timerfd: `fd` polls readable once the time set has come; `take()` then clears it."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._settime = libc.timerfd_settime
        self._settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
        self.fd = libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self._spec = _Itimerspec()

    def set(self, at: float) -> None:
        """Ring at `at` (time.monotonic seconds); at once if that has passed."""
        frac, whole = math.modf(max(at, 1e-9))
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = int(whole), max(int(frac * 1e9), 1)
        self._settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None)

    def take(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)


def alarm() -> Alarm | None:
    """An Alarm, or None where timerfds are not to be had (then the caller wakes its thread instead)."""
    # The process's own symbols, libc's among them: ctypes.util.find_library would run ldconfig (or a
    # compiler) in a subprocess, some 15 ms at every process's first flow.
    for lib in (None, "libc.so.6"):
        try:
            return Alarm(ctypes.CDLL(lib, use_errno=True))
        except (OSError, AttributeError):
            continue
    return None
