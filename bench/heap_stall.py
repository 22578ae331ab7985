"""Event-loop stall while a heapy snapshot is taken, with and without the forked child.

Builds a process holding over a million Python objects, runs an asyncio
loop that measures how late it wakes a task sleeping 5 ms at a time, and
takes heap snapshots the way the worker's /heap/ view does (a forked child,
read from a thread) and, for comparison, in-process.

    .venv/bin/python -m bench.heap_stall [--objects 1500000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from sessions_app.web.heapstats import snapshot_in_child, take_snapshot


async def worst_stall_during(action: object) -> tuple[float, float, dict[str, object]]:
    loop = asyncio.get_running_loop()
    worst = 0.0
    running = True

    async def watch() -> None:
        nonlocal worst
        while running:
            start = loop.time()
            await asyncio.sleep(0.005)
            worst = max(worst, (loop.time() - start - 0.005) * 1000)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    worst = 0.0
    began = time.monotonic()
    result = await action()  # type: ignore[operator]
    took = time.monotonic() - began
    running = False
    await watcher
    return worst, took, result


async def main(objects: int) -> None:
    ballast = [(i, str(i)) for i in range(objects // 3)]  # a tuple, an int and a str each

    async def forked() -> dict[str, object]:
        return await asyncio.to_thread(snapshot_in_child)

    async def in_process() -> dict[str, object]:
        return take_snapshot()

    for name, action in (("forked child (the /heap/ view)", forked), ("in-process", in_process)):
        stall, took, snapshot = await worst_stall_during(action)
        print(
            f"{name:32} {snapshot['count']:>10,} objects  snapshot {took:5.2f}s  "
            f"longest event-loop stall {stall:7.1f} ms"
        )
    del ballast


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1_500_000)
    asyncio.run(main(parser.parse_args().objects))
