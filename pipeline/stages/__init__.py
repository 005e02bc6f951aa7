"""The jobs, each run from a config: train, encode, re-encode, search, serve, plans, maintenance, baselines, demo, datasets."""
