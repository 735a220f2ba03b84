"""Tools the Makefile and CI run in a checkout (the test runner); not part of any
distribution, so nothing here ships in relayq or relayq-client."""
