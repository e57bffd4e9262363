"""Benchmark and results-composition scripts: they measure the package and write `docs/results/`.

Not part of the installed library: pyproject.toml does not list `fm_policy.eval.benchmarks` in `packages`, so the
wheel leaves it out, and no library module imports it. Run the scripts from a checkout with the editable install
(`scripts/setup.sh`), e.g. `python -m fm_policy.eval.benchmarks.compose_results`.
"""
