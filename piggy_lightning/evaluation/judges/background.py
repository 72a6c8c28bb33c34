"""Running an async judging batch from synchronous code, whether or not the caller already has an event loop.

Judges are called synchronously (the evaluation runner, Lightning callbacks), sometimes from a thread whose event loop
is running (a notebook, an async trainer hook), where ``asyncio.run`` refuses to start. :func:`stream` therefore runs
the batch on a fresh event loop in its own thread and hands results back through a queue as they arrive, so that the
judge cache can commit each judgement at once (a kill loses only the requests in flight). Closing the iterator early,
or an exception in the batch, cancels the requests still pending and waits for the thread to finish.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def stream(batch: Callable[[Callable[[T], None]], Coroutine[Any, Any, None]]) -> Iterator[list[T]]:
    """Yield, in groups, what ``batch(emit)`` passes to ``emit``, running it on a private loop in a worker thread.

    Args:
        batch: Makes the coroutine to run; it calls ``emit(item)`` for each result (from the worker thread).

    Each group holds every item that arrived since the previous one (at least one). An exception raised by the batch is
    re-raised here after the items emitted before it have been yielded.
    """
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    started = threading.Event()
    running: dict[str, Any] = {}

    async def main() -> None:
        running["loop"], running["task"] = asyncio.get_running_loop(), asyncio.current_task()
        started.set()
        await batch(items.put)

    def work() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread (or dropped when it cancelled us)
            items.put(_Raised(e))
        finally:
            started.set()
            items.put(_DONE)

    thread = threading.Thread(target=work, name="judge-event-loop", daemon=True)
    thread.start()
    try:
        finished = False
        while not finished:
            group, error = [], None
            item = items.get()
            while True:
                if item is _DONE:
                    finished = True
                elif isinstance(item, _Raised):
                    error = error or item.error
                else:
                    group.append(item)
                try:
                    item = items.get_nowait()
                except queue.Empty:
                    break
            if group:
                yield group
            if error is not None:
                raise error
    finally:  # the consumer stopped, or an error: cancel what is still pending and wait for the loop to close
        started.wait()
        if thread.is_alive() and "task" in running:
            try:
                running["loop"].call_soon_threadsafe(running["task"].cancel)
            except RuntimeError:  # the loop closed in the meantime
                pass
        thread.join()
