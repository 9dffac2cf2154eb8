"""The channel's language, with no I/O: framing, messages, the task lifecycle, vocabularies, end-to-end
MACs, chunk manifests and safe names. Imports only the standard library (orjson and cryptography
when present).
"""
