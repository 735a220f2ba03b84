"""The demo `relayq up` runs: a webhook sink, its configuration, sample traffic, a live view."""
