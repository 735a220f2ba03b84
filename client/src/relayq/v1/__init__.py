"""Generated protobuf and gRPC code for relayq.v1 (from protos/relayq/v1; do not edit)."""
