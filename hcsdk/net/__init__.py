"""Transports and servers the services share: TLS, the HTTP/2 client connection, the channel's client
side, the downlink mailbox, the ASGI and granian embedding, limits and the connection reaper,
enrollment.

(The services keep httpx's command line out of their processes on their own import: see
agent/__init__.py. Not here: every SDK user imports hcsdk.net.)
"""
