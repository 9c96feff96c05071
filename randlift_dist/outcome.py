"""What one attempt's exit codes mean: the launcher's decision, its words, and the job's one message.

Exit codes are the trainer's (`randlift_dist.train`): 0 done, 1 a failure a restart may cure, 2
bad input, 3 non-finite, 75 stopped on request with a checkpoint; a negative code is the signal
that ended a worker (torchrun's convention). Rank 0's `<run.dir>/exit_status.json` (`{"code",
"message", "said", "launch_id", "attempt"}`) counts only for the launch id and attempt it names:
no file time is read.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

EXIT_ERROR, EXIT_INPUT, EXIT_NONFINITE, EXIT_STOPPED = 1, 2, 3, 75  # as randlift_dist.train
FINAL = (EXIT_INPUT, EXIT_NONFINITE)  # a restart would repeat them


def read_status(run_dir: Path, launch_id: str, attempt: int | None = None) -> dict | None:
    """Rank 0's exit_status.json if it belongs to this launch (and attempt, unless None)."""
    try:
        st = json.loads((run_dir / "exit_status.json").read_text())
        ok = st.get("launch_id") == launch_id and (attempt is None or int(st.get("attempt", -1)) == attempt)
        return {"code": int(st["code"]), "message": str(st["message"]), "said": bool(st.get("said"))} if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe(failures: dict[int, int]) -> str:
    """`{rank: exitcode}` (negative: a signal) in words: 'SIGKILL to rank 1, exit status 1 from ranks 0, 2'."""
    by_code: dict[int, list[int]] = {}
    for rank, code in sorted(failures.items()):
        by_code.setdefault(code, []).append(rank)
    parts = []
    for code, ranks in sorted(by_code.items()):
        who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        if code < 0:
            try:
                parts.append(f"{signal.Signals(-code).name} to {who}")
            except ValueError:
                parts.append(f"signal {-code} to {who}")
        else:
            parts.append(f"exit status {code} from {who}")
    return ", ".join(parts)


def classify(failures: dict[int, int], status: dict | None) -> tuple[str, int]:
    """(`done` | `final` | `stopped` | `retry`, the job's status) from one attempt's exit codes and
    rank 0's status of that attempt. `stopped` needs every failed rank to have stopped on request:
    torchrun's agent sends SIGTERM to the survivors of a failure, and a survivor still in set-up
    then exits 75 too, beside the rank that failed."""
    codes = set(failures.values()) | ({status["code"]} if status and status["code"] else set())
    final = sorted(c for c in codes if c in FINAL)
    if final:
        return "final", status["code"] if status and status["code"] in final else final[0]
    if codes == {EXIT_STOPPED}:
        return "stopped", EXIT_STOPPED
    if not failures:
        return "done", 0
    return "retry", EXIT_ERROR


def report(rc: int, run_dir: Path, launch_id: str) -> int:
    """A failed job's one message: the trainer's status of this launch, else the agent logs' tails."""
    st = read_status(run_dir, launch_id)
    if st is not None and st["code"]:
        if not st["said"]:
            print(f"randlift-train: {st['message']}", file=sys.stderr, flush=True)
        return st["code"]
    for log in sorted(run_dir.glob("torchrun-*.log")):
        lines = log.read_text(errors="replace").splitlines()[-20:]
        print(f"randlift-launch: the job failed (status {rc}) and the trainer left no status; last {len(lines)} "
              f"lines of {log}:", file=sys.stderr)
        print("\n".join(lines), file=sys.stderr, flush=True)
    return rc
