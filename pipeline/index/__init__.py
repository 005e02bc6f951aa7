"""The index format of docs/index-format.md: shards, manifests and versions, history."""
