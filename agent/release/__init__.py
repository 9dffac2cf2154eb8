"""The agent's side of releases: receiving a release's chunks and putting the file in place.

- ``commands``: the system commands ``zy.release.fetch``, ``zy.release.place``, ``zy.release.rollback``
  (:class:`~agent.release.commands.Releases`, wired in by ``agent.core``)
- ``fetch``: fetching the missing chunks into the release's part file, from peers the proxy's
  tracker names or from the upstream; the agent's membership in the tracker
- ``place``: placing the fetched file at its destination atomically, the previous one kept; rollback
- ``chunkstore``: which release file on this agent holds each chunk (what peers are served from)
- ``peer``: serving chunks to peers over plain HTTP, and fetching from them; the rate cap
"""
