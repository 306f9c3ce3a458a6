"""Run a coroutine at once, on the running loop, up to its first suspension.

A task costs a loop iteration before its first step and its own bookkeeping;
for a coroutine that often finishes without ever waiting (a metadata read
from a local KV, a write that only fills a buffer), that is most of its cost
(measured here: 15–25 us of CPU per request in `flyfs meta`, 45–85 us per
blocking call of the client; BENCHMARKS.md, "Eighth session"). `start(coro)`
steps the coroutine now, synchronously: it either finished (its result, or
its exception raised) or it waits for something, and then a task takes it
over from exactly there.

While those first steps run there is no current task, so the coroutine must
not use `asyncio.timeout()` or `asyncio.current_task()` before it first waits
(`asyncio.wait_for`, locks, futures and sleeps are fine). It runs in
`context` (default: a copy of the current one), as a task would.

    done, value = start(loop, coro)     # (True, result) or (False, task)
"""
from __future__ import annotations

import asyncio
import collections.abc
import contextvars

__all__ = ["start"]


def start(loop: asyncio.AbstractEventLoop, coro, context: contextvars.Context | None = None):
    """Step `coro` now: (True, its result) when it finished; (False, a task going on
    with it) when it waits. An exception it raised before waiting is raised here."""
    if context is None:
        context = contextvars.copy_context()
    try:
        first = context.run(coro.send, None)
    except StopIteration as e:
        return True, e.value
    return False, loop.create_task(_Resumed(coro, first), context=context)


class _Resumed(collections.abc.Coroutine):
    """A coroutine already run up to its first suspension, where it yielded `first`
    (the future it waits for), handed to a task: the task's first step gets
    `first`; from then on, and for a cancellation even before that step, what the
    task sends or throws goes to the coroutine."""

    __slots__ = ("coro", "first", "__qualname__")

    def __init__(self, coro, first):
        self.coro, self.first = coro, first
        self.__qualname__ = getattr(coro, "__qualname__", type(coro).__name__)   # (a task's repr)

    def send(self, value):
        first = self.first
        if first is not _TAKEN:
            self.first = _TAKEN
            return first
        return self.coro.send(value)

    def throw(self, exc, *args):
        self.first = _TAKEN
        return self.coro.throw(exc, *args)

    def close(self):
        self.coro.close()

    def __await__(self):
        return (yield from _drive(self))


_TAKEN = object()


def _drive(co):
    """`await co` for a coroutine object that is not a native coroutine."""
    try:
        value = co.send(None)
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                co.close()
                raise
            except BaseException as exc:
                value = co.throw(exc)
            else:
                value = co.send(sent)
    except StopIteration as e:
        return e.value
