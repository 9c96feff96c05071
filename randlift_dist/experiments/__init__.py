"""Experiments over many runs.

- `convergence`: "does it converge?", a grid over lift sizes x seeds x lift kinds on any task
  (success: `target`, a metric and a bound), run locally in parallel processes or as a SLURM job
  array (`python -m randlift_dist.experiments.convergence --config configs/convergence_cpu.yaml`);
  `runner` runs the cells of a plan (one trainer process per cell), `cell` measures one finished
  run, `figures` aggregates (tables, figures, wandb).
- `threshold`: the price of randomness, s_90 / s_min per task and lift kind, adaptive (rounds of
  cells planned from the finished ones: `adaptive`, `price_plan`), reported by `price_report` and
  `price_figures`, costed before each round by `cost`
  (`python -m randlift_dist.experiments.threshold --config configs/price_cpu.yaml`).
- `collect`: `slurm/sweep.sbatch` trains one run per (lift size, seed) into `<root>/s<size>_seed<seed>`;
  `python -m randlift_dist.experiments.collect <root>` gathers them.
"""
