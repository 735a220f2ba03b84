"""relayq: the shared pieces of the three services (configuration, logs, gRPC plumbing), the
generated protobuf code (relayq.v1) and the `relayq` command."""
