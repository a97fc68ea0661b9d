"""asyncio helpers that stay correct under cancellation."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, limit_s: float | None) -> bool:
    """Wait for an event up to `limit_s` seconds; True if it was set.

    Python 3.11's asyncio.wait_for can swallow a cancellation that races with the awaited
    future completing, which leaves a task that ignores shutdown. asyncio.timeout does not.
    """
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(limit_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def within(aw: Awaitable[T], limit_s: float | None) -> T:
    """Await with a time limit (TimeoutError), without wait_for's lost-cancellation race."""
    async with asyncio.timeout(limit_s):
        return await aw


def stop_on_signals(event: asyncio.Event) -> None:
    """SIGTERM and SIGINT only set `event`; the daemon drains and exits on its own."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
