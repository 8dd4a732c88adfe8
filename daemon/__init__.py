"""storyreel's long-running part: watching, claiming, ordering, crash-safe state."""
