"""relayq-ingest: accepts event batches over gRPC and commits them as jobs before answering."""
