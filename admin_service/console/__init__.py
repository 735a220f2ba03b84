"""The operator console: relayq-admin's pages in a browser, on RELAYQ_ADMIN_CONSOLE_ADDRESS.

Server-rendered HTML (Jinja2) with htmx, vendored, for the figures that update live. Every
page reads and every form acts through admin_service.ops, the same operations the gRPC API
runs, with the caller its session stands for: a tenant token's session sees and changes its
tenant only, by the same rules and with the same audit as its gRPC calls.
"""
