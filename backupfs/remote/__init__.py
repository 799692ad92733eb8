"""Reaching a store over HTTP: one httpx client per process with explicit limits and
timeouts (client.py), the checks every reply must pass before its bytes count
(checks.py), credentials read from files (credentials.py) and the store's metadata
fetched through the client (metadata.py). The only layer that imports httpx and
httpcore; it uses trio and may import the core, linux and store.
"""
