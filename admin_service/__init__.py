"""relayq-admin: configuration, job queries, peek and force-retry for operators."""
