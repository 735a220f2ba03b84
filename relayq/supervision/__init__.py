"""The supervisor's parts (relayq.supervisor is its entry point): the worker processes it
starts (`children`), the metrics it adds up for them (`metrics`), and the loop that keeps them
running, restarts them and drains them (`keeper`)."""
