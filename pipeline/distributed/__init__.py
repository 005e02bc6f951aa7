"""Ray: the cluster, the byte-range datasource, the encode actors, the shard actors, the Ray Train run."""
