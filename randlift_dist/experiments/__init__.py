"""Experiments over many runs.

- `convergence`: "does it converge?", a grid over lift sizes x seeds x lift kinds on the
  teacher-student task, run locally in parallel processes or as a SLURM job array
  (`python -m randlift_dist.experiments.convergence --config configs/convergence_cpu.yaml`);
  `cell` measures one finished run, `figures` aggregates (tables, figures, wandb).
- `collect`: `slurm/sweep.sbatch` trains one run per (lift size, seed) into `<root>/s<size>_seed<seed>`;
  `python -m randlift_dist.experiments.collect <root>` gathers them.
"""
