"""Tests that run services as processes: start, kill -9, restart, signals, ports, the
README's commands, the client distribution in a fresh virtual environment."""
