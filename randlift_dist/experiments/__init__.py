"""Experiments over many runs: convergence sweeps (probability of reaching a target loss vs lift size).

`slurm/sweep.sbatch` trains one run per (lift size, seed) into `<root>/s<size>_seed<seed>`;
`python -m randlift_dist.experiments.collect <root>` gathers them (`collect.py`).
"""
