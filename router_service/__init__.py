"""relayq-router: leases partitions of the ordering-key space and delivers their jobs."""
