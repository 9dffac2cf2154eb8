"""Transports and servers the services share: TLS, the HTTP/2 client connection, the channel's client
side, the downlink mailbox, the ASGI and granian embedding, limits and the connection reaper,
enrollment.
"""
