"""`python -m randlift_dist.estimate --config FILE [--world-size P] [--device cpu|cuda] [--no-triton]
[--json] [key=value ...]`: the memory and exchange model of a run, printed as a table (or JSON).
Bad input: one line naming the value and the fix, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ..config import ConfigError, load_config
from ..planstats import format_bytes
from .rank import PARTS, EstimateError, estimate


def _fmt(n: float) -> str:
    return format_bytes(n, 2)


def format_table(est: dict[str, Any]) -> str:
    """The estimate as the CLI prints it: parts per rank, peak, set-up, host, exchange, edges."""
    on = est["device"] + (" (triton)" if est["device"] == "cuda" and est.get("triton") else "")
    lines = [f"world {est['world_size']} = lift_parallel {est['lift_parallel']} x data_parallel {est['data_parallel']}; "
             f"micro-batch {est['micro_batch']}; {est['engine']} {est['precision']} ZeRO-{est['zero_stage']} on {on}",
             f"parameters {est['params']:,.0f} (per rank {est['params_per_rank']:,.0f})", "",
             f"{'per rank':<18}{'bytes':>14}{'B/param':>10}"]
    for k in PARTS:
        b = est[f"{k}_bytes"]
        lines.append(f"{k:<18}{_fmt(b):>14}{b / max(est['params_per_rank'], 1):>10.2f}")
    lines += [f"{'peak':<18}{_fmt(est['peak_bytes_per_rank']):>14}{est['bytes_per_param']:>10.2f}"
              f"   (largest transient: {est['peak_phase']})",
              f"{'setup peak':<18}{_fmt(est['setup_peak_bytes_per_rank']):>14}"
              + ("   (host memory)" if est["device"] == "cuda" else ""),
              f"{'host':<18}{_fmt(est['host_bytes_per_rank']):>14}"
              + ("   (offloaded optimizer, data)" if est["device"] == "cuda" else "   (offloaded optimizer)"),
              f"exchange per step and rank: forward {_fmt(est['exchange_bytes_forward_per_step'])}, "
              f"backward {_fmt(est['exchange_bytes_backward_per_step'])}", "",
              f"{'edge':<12}{'mode':<10}{'kernel':<11}{'edges':>14}{'halo rows':>14}"]
    for e in est["edges"]:
        lines.append(f"{e['edge']:<12}{e['mode']:<10}{e['kernel']:<11}{e['edges']:>14,.0f}{e['halo_rows']:>14,.0f}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    ap = _Parser(prog="python -m randlift_dist.estimate",
                 description="Predicted memory per rank and exchange volume of a run, from its config alone.")
    ap.add_argument("--config", default=None, help="YAML config (default: the embedded tiny run)")
    ap.add_argument("--world-size", type=int, default=None, help="total ranks (default: parallel.lift_parallel)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where the model lives (default: cuda when parallel.backend=nccl, else cpu)")
    ap.add_argument("--no-triton", action="store_true",
                    help="on cuda, model a machine without triton (the blocked kernel instead of triton's)")
    ap.add_argument("--json", action="store_true", help="print a JSON object")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.lift.size=4096")
    args = ap.parse_args(argv)
    try:
        est = estimate(load_config(args.config, args.overrides), args.world_size, args.device,
                       False if args.no_triton else None)
    except (ConfigError, EstimateError) as err:
        print(f"{ap.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(json.dumps(est, indent=1) if args.json else format_table(est))
    return 0
