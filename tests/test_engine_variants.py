"""Every engine variant that runs on a CPU: one schedule, one curve, exact resumes.

Variants: the torch engine, and DeepSpeed at ZeRO 0 (fp32), ZeRO 1 and 2 x fp32 / bf16 x optimizer
offload off / on. (bf16 at ZeRO 0 is refused by the config: its fp32 master weights and moments
would live in DeepSpeed's FP16_UnfusedOptimizer, which the checkpoints cannot read.)

Two spawned gloo worlds build `Trainer`s in-process, one variant after another, and `fit()` each
through the real run directory (metrics.jsonl, checkpoints, resume):
- world size 1: every variant uninterrupted (6 steps: 3 of warm-up, then cosine), and stopped at
  step 3 (`train.stop_at`) then resumed by the same config; plus the offload regression run (the
  tiny default, ZeRO 1, warm-up 10, offload on and off, offload stopped at 20 and resumed).
- world size 2: every variant at lift-parallel 2, and each ZeRO 1/2 variant at data-parallel 2
  (where ZeRO shards the optimizer over the replicas), stopped at 3 and resumed there.
Checked per step: the lr logged equals `train.lr * lr_factor(cfg, step - 1)` exactly and equals
the lr in the stepping optimizer's param groups when it steps (hooked: no scheduler or DeepSpeed
code may change it); loss and gradient norm agree across layouts, with the uninterrupted run after
a resume, and between offload on and off. Tolerances: fp32 1e-5 relative (summation order only);
bf16 `BF16_RTOL` (see there), always bf16 against bf16; a resume against the uninterrupted run on
the same layout: bitwise, in every precision (`RESUME_RTOL`).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from distributed import run_world

BASE = ["model.lift.size=24", "data.n_train=256", "data.n_test=32", "train.batch_size=16", "train.steps=6",
        "train.warmup_steps=3", "train.lr=0.02", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0",
        "checkpoint.deepspeed_files=false", "wandb.mode=disabled", "run.progress=false"]
VARIANTS = {"torch": ["parallel.engine=torch"], "ds-z0-fp32": ["parallel.engine=deepspeed", "parallel.zero_stage=0"]}
for _z in (1, 2):
    for _prec in ("fp32", "bf16"):
        for _off in (False, True):
            VARIANTS[f"ds-z{_z}-{_prec}{'-offload' if _off else ''}"] = [
                "parallel.engine=deepspeed", f"parallel.zero_stage={_z}", f"parallel.precision={_prec}",
                f"parallel.offload_optimizer={str(_off).lower()}"]
FP32_RTOL = 1e-5
# bf16: the module's weights and activations carry 8 significant bits (unit roundoff 2^-8 = 3.9e-3).
# Another layout sums the aggregations and the readout's partial sums in another order, so it rounds
# differently at about that size; measured over these 6 steps (bf16 world size 1 against bf16 at
# lift- or data-parallel 2): 5e-4 relative on the loss, 2.4e-3 on the gradient norm at most. 2e-2 is
# five roundoffs; a layout bug (a gradient averaged twice, a shard's rows missing) is far larger,
# and the schedule is checked exactly on the lr, not through the loss.
BF16_RTOL = 2e-2
# A resume on the same layout computes the same operations as the uninterrupted run, bf16 included
# (the fp32 master weights are restored, not re-made from bf16 weights; DeepSpeed's CPU Adam has its
# running beta^t products replayed): equal to the last bit.
RESUME_RTOL = 0.0
# Offload on against off: DeepSpeed's vectorised CPU Adam against torch's Adam, both float32 but in
# another operation order (a few ulps per update), amplified to 3.3e-6 relative at most over the 6
# steps here and 2.3e-5 over the 40 of the offload regression run (lr 0.05). A wrong schedule moved the loss by
# 1.2e-2 at step 2 already.
OFFLOAD_RTOL = 1e-4
ISSUE = ["parallel.engine=deepspeed", "parallel.zero_stage=1", "train.steps=40", "train.warmup_steps=10",
         "train.log_every=1", "wandb.mode=disabled", "run.progress=false"]


def _fit(run_dir: Path, overrides: list[str], lift_parallel: int, base: list[str] = BASE) -> dict:
    """One invocation, as the CLI would run it: `{step: [lr, loss, grad_norm]}` from metrics.jsonl
    (rank 0; None elsewhere) and the lr of each optimizer step, seen by the stepping optimizer."""
    from randlift_dist import Layout
    from randlift_dist.config import load_config
    from randlift_dist.trainer import Trainer

    cfg = load_config(None, [*base, *overrides, f"run.dir={run_dir}", f"parallel.lift_parallel={lift_parallel}"])
    trainer = Trainer(cfg, Layout.from_initialized(lift_parallel))
    opt, used = trainer.engine.optimizer, []
    real_step = opt.step

    def step(*args, **kwargs):
        used.append(sorted({g["lr"] for g in opt.param_groups}))
        return real_step(*args, **kwargs)

    opt.step = step
    trainer.fit()
    rank = trainer.layout.rank
    del trainer, opt
    gc.collect()
    if rank != 0:
        return {"used_lr": used}
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"curve": {r["step"]: [r["lr"], r["loss"], r["grad_norm"]] for r in recs if "loss" in r}, "used_lr": used}


def _full_and_resumed(root: Path, name: str, overrides: list[str], lift_parallel: int) -> dict:
    full = _fit(root / f"{name}-full", overrides, lift_parallel)
    first = _fit(root / f"{name}-resume", [*overrides, "train.stop_at=3"], lift_parallel)
    second = _fit(root / f"{name}-resume", [*overrides, "train.stop_at=3"], lift_parallel)  # the same command
    return {"full": full, "first": first, "second": second}


def world_one(rank: int, world: int, root: str) -> dict:
    root = Path(root) / "ws1"
    out = {name: _full_and_resumed(root, name, ov, 1) for name, ov in VARIANTS.items()}
    issue = {}
    for name, extra in {"plain": [], "offload": ["parallel.offload_optimizer=true"]}.items():
        issue[name] = _fit(root / f"issue-{name}", extra, 1, base=ISSUE)
    for _ in range(2):  # stop at 20, then the same command again
        issue["resumed"] = _fit(root / "issue-resumed", ["parallel.offload_optimizer=true", "train.stop_at=20"], 1,
                                base=ISSUE)
    out["issue"] = issue
    return out


def world_two(rank: int, world: int, root: str) -> dict:
    root = Path(root) / "ws2"
    out = {}
    for name, ov in VARIANTS.items():
        out[name] = {"lp2": _fit(root / f"{name}-lp2", ov, 2)}
        if "-z0-" not in name and name != "torch":  # ZeRO shards over data-parallel replicas
            out[name]["dp2"] = _full_and_resumed(root, f"{name}-dp2", ov, 1)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    ws1 = run_world(world_one, 1, str(root), timeout=900)[0]
    ws2 = run_world(world_two, 2, str(root), timeout=900)[0]
    return ws1, ws2


def _schedule(overrides: list[str], base: list[str] = BASE) -> dict[int, float]:
    from randlift_dist.config import load_config
    from randlift_dist.engine import lr_factor

    cfg = load_config(None, [*base, *overrides])
    return {s: cfg.train.lr * lr_factor(cfg, s - 1) for s in range(1, cfg.train.steps + 1)}


def assert_same(got: dict, ref: dict, rtol: float, what: str, steps=None) -> None:
    """lr exactly equal; loss and gradient norm within `rtol` relative, at every step."""
    steps = sorted(ref) if steps is None else steps
    assert set(steps) <= set(got), f"{what}: missing steps {sorted(set(steps) - set(got))}"
    for s in steps:
        assert got[s][0] == ref[s][0], f"{what}: lr at step {s}: {got[s][0]} vs {ref[s][0]}"
        for i, key in ((1, "loss"), (2, "grad_norm")):
            rel = abs(got[s][i] - ref[s][i]) / abs(ref[s][i])
            assert rel <= rtol, f"{what}: {key} at step {s}: {got[s][i]:.8g} vs {ref[s][i]:.8g} ({rel:.2g} > {rtol})"


def _rtol(name: str) -> float:
    return BF16_RTOL if "bf16" in name else FP32_RTOL


def _check_lr(run: dict, schedule: dict[int, float], what: str) -> None:
    """Logged lr = the config's schedule, and = what the optimizer held when it stepped (the steps
    of this invocation: the last ones of the curve)."""
    curve, used = run["curve"], run["used_lr"]
    assert {s: v[0] for s, v in curve.items()} == {s: schedule[s] for s in curve}, what
    mine = sorted(curve)[len(curve) - len(used):]
    assert used and used == [[curve[s][0]] for s in mine], f"{what}: optimizer stepped with {used}"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_schedule_layouts_and_resume(runs, name):
    ws1, ws2 = runs
    ov, tol = VARIANTS[name], _rtol(name)
    schedule = _schedule(ov)
    ref = ws1[name]["full"]["curve"]
    assert sorted(ref) == list(range(1, 7))
    _check_lr(ws1[name]["full"], schedule, f"{name} ws1")
    # stop_at 3 then the same command: steps 4..6 equal the uninterrupted run's; lr exactly
    first, second = ws1[name]["first"], ws1[name]["second"]
    assert sorted(first["curve"]) == [1, 2, 3] and sorted(second["curve"]) == list(range(1, 7))
    _check_lr(second, schedule, f"{name} resumed")
    assert len(second["used_lr"]) == 3, second["used_lr"]
    assert_same(second["curve"], ref, RESUME_RTOL, f"{name}: resumed vs uninterrupted")
    # other layouts, same precision
    lp2 = ws2[name]["lp2"]
    _check_lr(lp2, schedule, f"{name} lp2")
    assert_same(lp2["curve"], ref, tol, f"{name}: lift-parallel 2 vs world size 1")
    if "dp2" in ws2[name]:
        dp2 = ws2[name]["dp2"]
        assert_same(dp2["full"]["curve"], ref, tol, f"{name}: data-parallel 2 vs world size 1")
        assert_same(dp2["second"]["curve"], dp2["full"]["curve"], RESUME_RTOL, f"{name}: data-parallel 2 resumed")
        assert dp2["second"]["used_lr"] == [[schedule[s]] for s in (4, 5, 6)]
    # the curve does not depend on where the optimizer state lives, nor (fp32) on the engine
    if name.endswith("-offload"):
        assert_same(ref, ws1[name[: -len("-offload")]]["full"]["curve"], max(tol, OFFLOAD_RTOL),
                    f"{name}: offload vs not")
    if "bf16" not in name:
        assert_same(ref, ws1["torch"]["full"]["curve"], FP32_RTOL, f"{name} vs the torch engine")


@pytest.mark.timeout(1800)
def test_the_issue_offload_warmup_and_resume(runs):
    """Issue 18: the tiny default at ZeRO 1, warm-up 10, offload on: lr at steps 1, 2, 5 is
    0.005, 0.010, 0.025 as without offload, and stop_at 20 + the same command continue the curve."""
    issue = runs[0]["issue"]
    plain, off, resumed = issue["plain"]["curve"], issue["offload"]["curve"], issue["resumed"]["curve"]
    for s, lr in ((1, 0.005), (2, 0.010), (5, 0.025), (10, 0.05), (11, 0.05)):
        assert plain[s][0] == pytest.approx(lr, rel=1e-12) and off[s][0] == plain[s][0], (s, plain[s], off[s])
    schedule = _schedule([], base=ISSUE)
    _check_lr(issue["offload"], schedule, "issue offload")
    assert_same(off, plain, OFFLOAD_RTOL, "issue: offload vs not")
    assert sorted(resumed) == list(range(1, 41))
    _check_lr(issue["resumed"], schedule, "issue resumed")
    assert len(issue["resumed"]["used_lr"]) == 20
    assert_same(resumed, off, RESUME_RTOL, "issue: offload stopped at 20 and resumed vs uninterrupted")


OURS = ("randlift_dist: ", "  edge ", "checkpoint /", "final step ", "randlift-train: checkpoint: ", "randlift-train: run ")


@pytest.mark.timeout(900)
def test_deepspeed_cli_at_world_size_two_says_only_its_own_lines(tmp_path, monkeypatch):
    """Through torchrun in the user's environment (no DS_ACCELERATOR, warnings shown),
    DeepSpeed ZeRO 2, bf16, offload, data-parallel 2: no DeepSpeed notice from any rank (every line
    is the trainer's, each once). Then the finished-means-intact check at world size 2: the final
    checkpoint damaged, the same command reports it once, trains steps 3..4 again, then is finished."""
    import launch

    env = {k: v for k, v in launch.train_env().items() if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS")}
    monkeypatch.setattr(launch, "train_env", lambda extra=None: {**env, **(extra or {})})
    same = ["wandb.mode=disabled", "parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.precision=bf16",
            "parallel.offload_optimizer=true", "train.steps=4", "checkpoint.every=2", "train.log_every=1"]
    first = launch.launch(tmp_path, 2, *same, timeout=600)
    lines = (first.stdout + first.stderr).splitlines()
    assert all(ln.startswith(OURS) for ln in lines), "\n".join(lines)
    assert sum(ln.startswith("randlift_dist: ") for ln in lines) == 1 and len(lines) == 7, "\n".join(lines)
    curve = {r["step"]: r["loss"] for r in launch.metrics(tmp_path) if "loss" in r}
    final = tmp_path / "checkpoints" / "step_00000004" / "shard_0000.bin"
    raw = bytearray(final.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    final.write_bytes(bytes(raw))
    second = launch.launch(tmp_path, 2, *same, timeout=600)
    lines = (second.stdout + second.stderr).splitlines()
    assert all(ln.startswith(OURS) for ln in lines), "\n".join(lines)
    named = [ln for ln in lines if str(final) in ln]
    assert len(named) == 1 and "sha256" in named[0] and "the final checkpoint" in named[0], "\n".join(lines)
    assert f"resuming from {final.parent.parent / 'step_00000002'} (newest intact checkpoint)" in second.stderr
    assert [r["step"] for r in launch.metrics(tmp_path) if "loss" in r] == [1, 2, 3, 4]
    assert {r["step"]: r["loss"] for r in launch.metrics(tmp_path) if "loss" in r} == curve
    third = launch.launch(tmp_path, 2, *same, timeout=600)
    assert "already finished" in third.stdout and len((third.stdout + third.stderr).strip().splitlines()) == 1, \
        third.stdout + third.stderr
