"""The same client measurement on two source trees of qdb_client: before and after.

A change to the request path is judged by its ratio to the code before it,
on the same machine, against the same stub node, runs alternating. This
runs ``bench/peer_client.py --system qdb`` (point reads, or with
``--workload write`` small keyed inserts; one connection)
once per tree per in-flight level per round, with ``PYTHONPATH`` set to
the tree, so each process imports that tree's ``qdb_client``; it prints
the medians and the median of the per-round after/before ratios.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/bench_before_after.py /tmp/before [--after .] [--rounds 5]
        [--workload read|write]

Only the package is taken from each tree; the stub node and the measuring
client are this tree's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_peers import stub_node

HERE = Path(__file__).resolve().parent


def measure(tree: Path, address: str, in_flight: int, requests: int, workload: str) -> float:
    """Client CPU per request (us) of one run with ``tree``'s qdb_client."""
    command = [sys.executable, str(HERE / "peer_client.py"), "--system", "qdb"]
    command += ["--workload", workload]
    command += ["--address", address, "--in-flight", str(in_flight), "--requests", str(requests)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"run failed for {tree}:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["cpu_us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="source tree of the code before")
    parser.add_argument("--after", type=Path, default=HERE.parent, help="default: this tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument(
        "--workload", choices=["read", "write"], default="read", help="point read or keyed insert"
    )
    ns = parser.parse_args()
    trees = {"before": ns.before.resolve(), "after": ns.after.resolve()}
    for name, tree in trees.items():
        if not (tree / "qdb_client" / "__init__.py").exists():
            raise SystemExit(f"{name}: no qdb_client package in {tree}")
    levels = [int(x) for x in ns.levels.split(",")]
    results: dict[tuple[str, int], list[float]] = {}
    with stub_node() as address:
        for round_number in range(ns.rounds):
            for level in levels:
                for name, tree in trees.items():
                    cpu = measure(tree, address, level, ns.requests, ns.workload)
                    results.setdefault((name, level), []).append(cpu)
            print(f"  round {round_number + 1}/{ns.rounds} done", flush=True)
    what = "point read" if ns.workload == "read" else "keyed insert"
    print(f"\nclient CPU per request, us ({what}, stub node, {ns.rounds} rounds)")
    print("  in flight   before    after   after/before")
    for level in levels:
        before, after = results[("before", level)], results[("after", level)]
        ratio = statistics.median(a / b for a, b in zip(after, before, strict=True))
        print(
            f"  {level:>9} {statistics.median(before):8.1f} {statistics.median(after):8.1f}"
            f"   {ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
