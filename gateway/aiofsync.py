"""fsync without a thread: Linux native AIO (``IOCB_CMD_FSYNC``) signalled on an eventfd.

``io_submit`` hands the fsync to a kernel worker and returns at once; each
completion increments an eventfd that the event loop watches.  The audit
log's group commit uses it (see :mod:`gateway.audit`): a round of fsyncs
then costs the event loop three system calls, where a Python thread has to
be woken, take the interpreter lock to run and take it again to report
back (on a VM each of those hand-offs costs more than the system calls).

Linux only, x86_64 and aarch64, kernels from 4.18 (the first to fsync
through AIO).  :class:`AioContext` raises OSError where the kernel or a
seccomp filter refuses ``io_setup``; a completion reports ``-EINVAL`` where
the file's filesystem cannot fsync through AIO.  Callers fall back to a
thread then.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import platform
import threading
import weakref
from typing import Final

__all__ = ["UNSUPPORTED", "AioContext"]

# io_setup, io_destroy, io_getevents, io_submit
_SYSCALLS: Final = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_FSYNC: Final = 2
_IOCB_CMD_FDSYNC: Final = 3
_IOCB_FLAG_RESFD: Final = 1
# What says "not here" (as opposed to an I/O error of the fsync itself).
UNSUPPORTED: Final = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM})

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Iocb(ctypes.Structure):
    """``struct iocb`` (linux/aio_abi.h), little-endian field order."""

    _fields_ = (
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    )


class _IoEvent(ctypes.Structure):
    """``struct io_event``."""

    _fields_ = (
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    )


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _release(numbers: tuple[int, int, int, int], ctx: int, eventfd: int) -> None:
    os.close(eventfd)
    # io_destroy waits for the fsyncs still running and then for an RCU grace
    # period: 33 ms on the benchmark VM.  Not on the caller's thread (the
    # event loop's); at interpreter shutdown the kernel frees it at exit.
    destroy = functools.partial(_syscall, ctypes.c_long(numbers[1]), ctypes.c_ulong(ctx))
    with contextlib.suppress(RuntimeError):
        threading.Thread(target=destroy, name="aio-destroy", daemon=True).start()


class AioContext:
    """One AIO context and its eventfd; owned by one thread (the event loop's).

    :meth:`submit_fsync` queues an fsync tagged with a token;
    :meth:`completions` (call it when :attr:`eventfd` is readable) returns
    the ``(token, result)`` of those that ended: 0, or ``-errno``.
    """

    def __init__(self, max_events: int = 8) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise OSError(errno.ENOSYS, f"no AIO system call numbers for {platform.machine()}")
        self._numbers = numbers
        self._max = max_events
        ctx = ctypes.c_ulong(0)
        _check(_syscall(ctypes.c_long(numbers[0]), ctypes.c_long(max_events), ctypes.byref(ctx)))
        self._ctx = ctx.value
        try:
            self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            _syscall(ctypes.c_long(numbers[1]), ctypes.c_ulong(self._ctx))
            raise
        self._events = (_IoEvent * max_events)()
        self._no_wait = (ctypes.c_long * 2)(0, 0)
        self._finalizer = weakref.finalize(self, _release, numbers, self._ctx, self.eventfd)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def submit_fsync(self, fd: int, token: int, *, datasync: bool = False) -> None:
        """Queue an fsync (or fdatasync) of ``fd``; raises OSError if the kernel refuses it."""
        cb = _Iocb(
            aio_data=token,
            aio_lio_opcode=_IOCB_CMD_FDSYNC if datasync else _IOCB_CMD_FSYNC,
            aio_fildes=fd,
            aio_flags=_IOCB_FLAG_RESFD,
            aio_resfd=self.eventfd,
        )
        # The kernel copies the iocb during the call.
        batch = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(cb))
        _check(
            _syscall(
                ctypes.c_long(self._numbers[3]),
                ctypes.c_ulong(self._ctx),
                ctypes.c_long(1),
                batch,
            )
        )

    def completions(self) -> list[tuple[int, int]]:
        """The fsyncs that ended since the last call: ``(token, 0 or -errno)``."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.eventfd)
        done: list[tuple[int, int]] = []
        while True:
            got = _check(
                _syscall(
                    ctypes.c_long(self._numbers[2]),
                    ctypes.c_ulong(self._ctx),
                    ctypes.c_long(0),
                    ctypes.c_long(self._max),
                    self._events,
                    self._no_wait,
                )
            )
            done.extend((int(e.data), int(e.res)) for e in self._events[:got])
            if got < self._max:
                return done

    def close(self) -> None:
        """Close the eventfd now and destroy the context on a short-lived thread."""
        self._finalizer()
