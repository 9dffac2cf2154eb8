"""Small pieces every side shares: the error tree, identity and state dirs, host facts, client config,
join tokens, backoff, durations, the version. No network I/O, no httpx, pandas or IPython.
"""
