"""What the CLI and jobs/ run: train, encode, re-encode, search, baselines, demo, datasets."""
