"""The virtual clock: time jumps to the next timer while driven, and stands still while paused."""

from __future__ import annotations

import asyncio
import threading
import time

from macula_lab.sim.clock import EPOCH, VirtualTimeLoop


def test_an_hour_of_sleeps_passes_at_cpu_speed():
    loop = VirtualTimeLoop()
    try:

        async def main() -> tuple[float, float]:
            loop.driving += 1
            t0 = time.perf_counter()
            await asyncio.sleep(3600)
            await asyncio.gather(*(asyncio.sleep(i / 1000) for i in range(1000)))
            return loop.time(), time.perf_counter() - t0

        virtual, wall = loop.run_until_complete(main())
        assert virtual == 3600 + 0.999
        assert wall < 5
        assert loop.wall_time() == EPOCH + virtual
    finally:
        loop.close()


def test_timeouts_fire_in_virtual_time():
    loop = VirtualTimeLoop()
    try:

        async def main() -> float:
            loop.driving += 1
            try:
                await asyncio.wait_for(asyncio.sleep(100), 5)
            except TimeoutError:
                return loop.time()
            return -1.0

        assert loop.run_until_complete(main()) == 5
    finally:
        loop.close()


def test_a_paused_loop_does_not_age_and_the_trace_records_jumps():
    loop = VirtualTimeLoop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        loop.call_soon_threadsafe(lambda: loop.call_later(10, lambda: None))
        assert loop.idle.wait(5)
        time.sleep(0.05)  # paused with a timer pending: no jump
        assert loop.time() == 0.0 and loop.jumps == 0
        before = loop.trace_hash()

        async def drive() -> None:
            loop.driving += 1
            await asyncio.sleep(20)
            loop.driving -= 1

        asyncio.run_coroutine_threadsafe(drive(), loop).result(5)
        assert loop.time() == 20.0 and loop.jumps == 2  # the pending timer, then the sleep
        assert loop.trace_hash() != before
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
