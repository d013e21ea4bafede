"""The expiry timer under a storm of timeouts: CPU per expired wait.

A stalled node leaves every request on it waiting until its own expiry, and
requests sent one after another have distinct expiries, so the client's
expiry timer (``qdb_client/_transport/pending.py``) wakes once for each.
This adds N waits with distinct expiries (0.1 ms apart, in virtual time, as
if N requests had gone to a stalled node in a burst) and lets all of them
expire, printing the timer's CPU in all and per wait. The per-wait cost
should stay flat as N grows (a timer that scanned every wait at each
wake-up grew with N: 7.8 s for 10,000).

    .venv/bin/python bench/bench_expiries.py [--sizes 1000,5000,10000]
"""

from __future__ import annotations

import argparse
import time

import trio
import trio.testing

from qdb_client._transport import Expiries


class _Wait:
    __slots__ = ("_timer_key", "expired")

    def __init__(self) -> None:
        self._timer_key = -1
        self.expired = False

    def _expire(self, why: object = None) -> None:
        self.expired = True


async def storm(size: int) -> float:
    expiries = Expiries()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(expiries.run)
        await trio.testing.wait_all_tasks_blocked()
        now = trio.current_time()
        waits = [_Wait() for _ in range(size)]
        for i, wait in enumerate(waits):
            expiries.add(wait, now + 1.0 + i * 1e-4)  # type: ignore[arg-type]
        began = time.process_time()
        await trio.sleep(2.0 + size * 1e-4)
        cpu = time.process_time() - began
        assert all(w.expired for w in waits) and len(expiries) == 0
        nursery.cancel_scope.cancel()
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    args = parser.parse_args()
    print(f"  {'waits':>7}  {'cpu s':>7}  {'us per wait':>11}")
    for size in (int(x) for x in args.sizes.split(",")):
        cpu = trio.run(storm, size, clock=trio.testing.MockClock(autojump_threshold=0))
        print(f"  {size:>7}  {cpu:>7.3f}  {cpu / size * 1e6:>11.1f}")


if __name__ == "__main__":
    main()
