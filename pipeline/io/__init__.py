"""Storage (local and S3) and the files the pipeline reads and writes: vectors, codes, results; input planning and row sampling."""
