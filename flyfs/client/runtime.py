"""The client's background event loop: one thread per process runs the async core.

Synchronous callers (FileSystem, FUSE threads, DataLoader workers) hand
coroutines to `Runtime.run`, which blocks the calling thread, never the loop.
Any number of threads may call at once.

Fork safety (DataLoader workers fork):

- After a fork only the forking thread exists in the child; a loop thread
  inherited from the parent is gone, and so are gRPC's own threads. Every
  Runtime drops its dead loop in the child (``os.register_at_fork``) and
  starts a fresh one on first use; clients built on the old loop are rebuilt
  by their owners (FileSystem checks ``os.getpid()``).
- gRPC keeps process-global state that a child cannot use if the parent was
  inside a call at fork time (measured: the child hangs or segfaults).
  Control-plane calls therefore run through `rpc_gate`: the before-fork
  handler closes the gate and waits (bounded) for calls in flight to finish,
  so gRPC's own fork handlers (``GRPC_ENABLE_FORK_SUPPORT``, set in
  flyfs/client/__init__.py before gRPC is imported) see a quiet library.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import socket
import threading
import weakref
from typing import Any, Awaitable, Callable, TypeVar

from ..net import eager

log = logging.getLogger("flyfs.client")

__all__ = ["Runtime", "get_runtime", "rpc_gate", "RpcGate", "on_fork_child", "on_exit"]

T = TypeVar("T")


class RpcGate:
    """Counts blocking RPCs in flight; closed around fork() so none is in flight then."""

    def __init__(self, drain_timeout: float = 10.0):
        self.drain_timeout = drain_timeout
        self._cond = threading.Condition(threading.Lock())
        self._inflight = 0
        self._closed = False

    def __enter__(self):
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._inflight += 1
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._inflight -= 1
            if self._inflight == 0:
                self._cond.notify_all()

    @property
    def inflight(self) -> int:
        return self._inflight

    def close_and_drain(self) -> bool:
        """Stop new calls and wait for those in flight; False if some did not finish in time."""
        with self._cond:
            self._closed = True
            return self._cond.wait_for(lambda: self._inflight == 0, timeout=self.drain_timeout)

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._cond.notify_all()

    def reset_in_child(self) -> None:
        # The child has only the forking thread: nothing is in flight and the
        # condition's lock may have been copied mid-use, so start afresh.
        self._cond = threading.Condition(threading.Lock())
        self._inflight = 0
        self._closed = False


rpc_gate = RpcGate()


class Runtime:
    """An asyncio event loop running in a daemon thread, started on first use.

    run(coro) blocks the caller until the coroutine finishes on the loop and
    returns its result (or raises its exception). Calling run from the loop's
    own thread would deadlock and raises RuntimeError instead.
    """

    def __init__(self, name: str = "flyfs-client"):
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        _RUNTIMES.add(self)

    # ---- lifecycle ------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (started now if needed)."""
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._lock:
            if self._pid != os.getpid():  # a fork the handlers did not see (e.g. os.fork from C)
                self._forget()
            if self._loop is None:
                self._start()
            return self._loop

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def main():
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            try:
                loop.run_forever()
            finally:
                try:
                    _cancel_all(loop)
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        t = threading.Thread(target=main, name=self.name, daemon=True)
        t.start()
        started.wait()
        self._loop, self._thread = loop, t

    @property
    def started(self) -> bool:
        return self._loop is not None and self._pid == os.getpid()

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future:
        """Schedule a coroutine on the loop; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """Run a coroutine on the loop and wait for its result (TimeoutError after `timeout` s).

        The loop runs it at once up to its first wait (flyfs.net.eager: no task
        for a call that never waits) and the caller waits on a plain lock: a
        hop to the loop and back costs 48–84 us here against 128–133 us through
        run_coroutine_threadsafe (BENCHMARKS.md, "Eighth session")."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("flyfs: a blocking FileSystem call was made from the client's own event "
                               "loop thread; use the AsyncFileSystem API there")
        call = _Call(coro)
        loop = self.loop
        loop.call_soon_threadsafe(call.start, loop)
        try:
            finished = call.lock.acquire(timeout=-1 if timeout is None else timeout)
        except BaseException:
            # KeyboardInterrupt while waiting: do not leave the operation running.
            loop.call_soon_threadsafe(call.cancel)
            raise
        if not finished:
            loop.call_soon_threadsafe(call.cancel)
            raise TimeoutError(f"flyfs: operation did not finish within {timeout:g} s")
        if call.ok:
            return call.value
        try:
            raise call.value
        finally:
            call.value = None   # (no reference cycle through the traceback)

    def call_soon(self, fn: Callable[..., Any], *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop thread (pending tasks are cancelled); a later use starts a new one."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or self._pid != os.getpid():
            return
        if thread is threading.current_thread():
            loop.stop()
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # already closed
            return
        thread.join(timeout)

    # ---- fork ---------------------------------------------------------------------------
    def _forget(self) -> None:
        """In a forked child: drop the parent's loop (its thread does not exist here)."""
        loop, self._loop, self._thread = self._loop, None, None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        if loop is not None:
            _release_inherited(loop)


class _Call:
    """One Runtime.run: started on the loop, its outcome handed back through a lock."""

    __slots__ = ("coro", "lock", "ok", "value", "task", "cancelled")

    def __init__(self, coro):
        self.coro = coro
        self.lock = threading.Lock()
        self.lock.acquire()     # released once the outcome is in
        self.ok = False
        self.value: Any = None  # the result, or the exception when not ok
        self.task: asyncio.Task | None = None
        self.cancelled = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        coro, self.coro = self.coro, None
        if self.cancelled:
            coro.close()
            self._finish(False, asyncio.CancelledError())
            return
        try:
            done, value = eager.start(loop, coro)
        except BaseException as e:
            self._finish(False, e)
            return
        if done:
            self._finish(True, value)
        else:
            self.task = value
            value.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            self._finish(False, asyncio.CancelledError())
        elif task.exception() is not None:
            self._finish(False, task.exception())
        else:
            self._finish(True, task.result())

    def _finish(self, ok: bool, value) -> None:
        self.ok, self.value, self.task = ok, value, None
        self.lock.release()

    def cancel(self) -> None:
        """On the loop: the caller gave up (timeout, KeyboardInterrupt)."""
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def _release_inherited(loop: asyncio.AbstractEventLoop) -> None:
    """Close the child's copies of the parent loop's sockets and selector.

    The loop object itself is abandoned (it believes it is running, and its
    thread is gone). Closing the socket objects (not raw fd numbers) keeps
    later garbage collection from closing an fd number that has been reused,
    and lets the parent's connections end when the parent closes them.
    """
    try:
        selector = getattr(loop, "_selector", None)
        if selector is not None:
            for key in list(selector.get_map().values()):
                if isinstance(key.fileobj, socket.socket):
                    key.fileobj.close()
            selector.close()
        for attr in ("_ssock", "_csock"):
            s = getattr(loop, attr, None)
            if isinstance(s, socket.socket):
                s.close()
    except Exception as e:  # best effort: a leaked fd in a child is harmless
        log.debug("releasing the inherited event loop: %s", e)


_RUNTIMES: "weakref.WeakSet[Runtime]" = weakref.WeakSet()
_CHILD_HOOKS: list[Callable[[], None]] = []
_EXIT_HOOKS: list[Callable[[], None]] = []
_default: Runtime | None = None
_default_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process-wide runtime shared by every FileSystem of this process."""
    global _default
    rt = _default
    if rt is not None:
        return rt
    with _default_lock:
        if _default is None:
            _default = Runtime()
        return _default


def on_fork_child(fn: Callable[[], None]) -> None:
    """Register a function run in every forked child (after the runtimes are reset)."""
    _CHILD_HOOKS.append(fn)


def on_exit(fn: Callable[[], None]) -> None:
    """Register a function run at interpreter exit, before the loop threads stop."""
    _EXIT_HOOKS.append(fn)


def _before_fork() -> None:
    if not rpc_gate.close_and_drain():
        log.warning("fork: %d control-plane call(s) still in flight after %.0f s; the child may not "
                    "be able to use gRPC", rpc_gate.inflight, rpc_gate.drain_timeout)


def _after_fork_parent() -> None:
    rpc_gate.reopen()


def _after_fork_child() -> None:
    global _default_lock
    rpc_gate.reset_in_child()
    _default_lock = threading.Lock()
    for rt in list(_RUNTIMES):
        rt._forget()
    for fn in list(_CHILD_HOOKS):
        try:
            fn()
        except Exception as e:
            log.debug("fork child hook %r failed: %s", fn, e)


def _at_exit() -> None:
    for fn in list(_EXIT_HOOKS):
        try:
            fn()
        except Exception as e:
            log.debug("exit hook %r failed: %s", fn, e)
    for rt in list(_RUNTIMES):
        rt.stop(timeout=5.0)


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_parent,
                    after_in_child=_after_fork_child)
atexit.register(_at_exit)
