"""Ray Tune + Optuna multi-objective search over pipeline configs, and its Pareto front."""
