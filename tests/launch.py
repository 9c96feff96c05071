"""Running the real entry point as a user would: a plain process or torchrun, reading metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def train_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore",
               WANDB_MODE="offline", WANDB_SILENT="true")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    env.update(extra or {})
    return env


def launch(run_dir: Path, nproc: int, *overrides: str, config: str | None = None, timeout: float = 300,
           check: bool = True) -> subprocess.CompletedProcess:
    """`python -m randlift_dist.train` (nproc 1) or `torchrun --nproc_per_node nproc` on this CPU."""
    args = ([] if config is None else ["--config", config]) + [f"run.dir={run_dir}", "run.progress=false", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "randlift_dist.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "randlift_dist.train", *args]
    proc = subprocess.run(cmd, env=train_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def assert_curves_match(got: dict[int, float], ref: dict[int, float], rtol: float, steps=None) -> None:
    steps = sorted(ref) if steps is None else steps
    assert set(steps) <= set(got), f"missing steps {sorted(set(steps) - set(got))}"
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in steps)
    assert worst <= rtol, f"loss curves differ by {worst:.3g} relative (> {rtol}): " + \
        ", ".join(f"{s}: {got[s]:.7g} vs {ref[s]:.7g}" for s in steps[:5])


# ------------------------------------------------------------------ the launchers (launch/*.sh)
REPO = Path(__file__).resolve().parents[1]


def launcher_cmd(script: str, run_dir: Path, *overrides: str) -> list[str]:
    """`bash launch/<script> run.dir=... run.progress=false overrides...`."""
    return ["bash", str(REPO / "launch" / script), f"run.dir={run_dir}", "run.progress=false", *overrides]


def launcher_env(extra: dict | None = None) -> dict:
    """train_env with the interpreter running the tests first on PATH (the launchers call `python`)."""
    env = train_env({"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
    env.update(extra or {})
    return env


def run_launcher(script: str, run_dir: Path, *overrides: str, env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(launcher_cmd(script, run_dir, *overrides), env=launcher_env(env), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def partial_metrics(run_dir: Path) -> list[dict]:
    """The complete records of a metrics.jsonl that may be being written (a torn last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def _cmdline(pid: int | str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def trainer_workers(run_dir: Path) -> dict[int, int]:
    """{rank: pid} of the torchrun workers training in `run_dir`: processes running the trainer
    whose parent (the launcher, which is the torchrun agent) runs the trainer or the launcher."""
    found = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        cmd = _cmdline(p.name)
        if "randlift_dist.train" not in cmd or f"run.dir={run_dir}" not in cmd:
            continue
        try:
            ppid = int(Path(f"/proc/{p.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{p.name}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if not {"randlift_dist.train", "randlift_dist.launcher"} & set(_cmdline(ppid)):
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = int(p.name)
    return found
