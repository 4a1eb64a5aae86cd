"""Ray Tune sweeps over DINO-QPM settings: search spaces, the trial, and the sweep's results (table, Pareto, best).

Entry point: `python tune/sweep.py --config configs/demo.yaml --space tune/spaces/default.yaml --num-samples N`.
Modules: `space` (YAML search spaces over dotted config keys, validated before Ray starts), `trial` (what one trial
runs, alone or with Ray Train workers), `results` (rows, Pareto front, choice of the best, table/CSV/best.yaml) and
`runner` (Ray start-up and the Tuner).
"""
