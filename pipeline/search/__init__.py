"""Search: its parameters and stages (probe, lookup-table scan, merge, re-rank) and the accuracy measures."""
