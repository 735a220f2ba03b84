"""Tests against the real thing in-process: a real Postgres, real gRPC servers and
HTTP sinks on loopback, services run inside the test's event loop."""
