"""Pure unit tests: no Postgres, no service processes (make test-unit, well under a minute)."""
