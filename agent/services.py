"""What the agent lends the parts that carry out its system commands (releases, schedules,
self-update): they are given an :class:`AgentServices`, not the agent, so they import nothing of
``agent.core`` and reach into none of its private state. ``agent.core.Agent`` implements it and
passes itself in; a test can pass anything with these members.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from hcsdk.net.channel import Channel
    from hcsdk.protocol.messages import Message

    from .executor import Executor, Task
    from .memspool import MemorySpool
    from .spool import Spool


class AgentServices(Protocol):
    @property
    def uuid(self) -> str:
        """This agent's uuid (the address of every message it sends)."""

    @property
    def hostname(self) -> str | None:
        """The hostname it reports (None: the machine's)."""

    @property
    def state_root(self) -> Path:
        """Its state directory (``--state-dir``), where each part keeps its files."""

    @property
    def channel(self) -> Channel:
        """Its channel to the master (through its proxies)."""

    @property
    def executor(self) -> Executor:
        """What runs its tasks: submit, cancel, hold, the running ones."""

    @property
    def spool(self) -> Spool | MemorySpool:
        """Its outbox of results (shared with the other build during an update)."""

    @property
    def task_group(self) -> TaskGroup | None:
        """The agent's task group for work that lives as long as the agent (None until it runs)."""

    def emit(self, msgs: list[Message]) -> None:
        """Sign uplink messages, spool them and wake the channel to send them."""

    def emit_text(self, task: Task, stream: str, text: str) -> None:
        """Send ``text`` as the task's output on ``stream`` (in frame-sized pieces)."""
