"""The short tier of the soak (docs/reliability.md): ``scripts/soak.sh`` for about 50 s.

It runs the whole soak as a subprocess, exactly as a person would, and
asserts only what the soak itself decides: its exit status (0 means every
check passed) and that no process it started is left behind. No timing is
asserted here; the soak's own thresholds are generous enough for a loaded
2-core machine. ``QDB_SOAK_SEED`` and ``QDB_SOAK_DURATION`` override the
seed and duration.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("QDB_SOAK_SEED", "7"))
DURATION = int(os.environ.get("QDB_SOAK_DURATION", "50"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.timeout(DURATION + 240)
def test_short_soak_passes_and_leaves_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    result = subprocess.run(
        [
            str(ROOT / "scripts" / "soak.sh"),
            "--duration",
            str(DURATION),
            "--seed",
            str(SEED),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DURATION + 200,
        check=False,
    )
    tail = "\n".join(result.stdout.splitlines()[-60:])
    assert result.returncode == 0, f"soak failed ({result.returncode}):\n{tail}\n{result.stderr}"
    assert "SOAK PASS" in result.stdout.splitlines()[-1], tail
    assert (out / "timeline.html").exists() and (out / "verdict.json").exists()
    # Every fault reached its target: a control call the node refused (its control
    # token missing or stale after a restart) would leave the run without faults.
    faults = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    refused = [f for f in faults if f.get("error") and "PERMISSION_DENIED" in f["error"]]
    assert faults and refused == [], refused
    started = [int(line.split()[0]) for line in (out / "pids").read_text().splitlines()]
    assert len(started) >= 10  # runner, 3 nodes, 3 proxies, 3 clients (+ restarts)
    assert [pid for pid in started if _alive(pid)] == []
