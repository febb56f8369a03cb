"""Scaling experiments: spec -> runs (each a normal run_dir) -> results.csv -> fits -> plots.

spec.py    the spec file (pydantic) and its expansion into resolved, hash-named run configs
runs.py    what each run directory holds: status, progress, its row of results
pool.py    executing runs: a local worker pool, or one run per cluster task (--index)
emit.py    a SLURM array script / Kubernetes Indexed Job that runs a sweep one task per run
fit.py     IsoFLOP parabolas, the parametric L(N, D) fit, bootstrap intervals, hold-out
report.py  results.csv and the plots
cli.py     `gptjax sweep plan|run|status|report|fit|emit`
"""
