"""The channel's language, with no I/O: framing, messages, the task lifecycle, vocabularies, end-to-end
MACs, chunk manifests and safe names. Imports only the standard library (orjson and cryptography
when present).

The names below load on first use (``__getattr__``): every plugin worker starts with
``import hcsdk.protocol.args``, which must not pull in the messages, the framing and orjson.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy, ruff and IDEs see; at run time __getattr__ imports the module
    from .errors import MessageError, ProtocolError
    from .messages import (
        DOWN,
        UP,
        Ack,
        Bye,
        Cancel,
        Direction,
        Done,
        Heartbeat,
        Message,
        MessageDecoder,
        Out,
        Sample,
        Start,
        Stats,
        Task,
        encode_messages,
        parse,
        problem,
    )
    from .tasks import FINAL, OPEN, TRANSITIONS, SessionKind, SessionState, TaskStatus, Verdict, can_move, is_final
    from .vocab import BUILTIN_ARGS, BUILTIN_CMDS, SYSTEM_CMDS, check_cmd, check_request_args, validate_args
    from .wire import FrameError

#: module -> the public names it defines (tests/test_protocol.py checks it against __all__)
_FROM = {
    "errors": ("MessageError", "ProtocolError"),
    "messages": ("DOWN", "UP", "Ack", "Bye", "Cancel", "Direction", "Done", "Heartbeat", "Message", "MessageDecoder",
                 "Out", "Sample", "Start", "Stats", "Task", "encode_messages", "parse", "problem"),
    "tasks": ("FINAL", "OPEN", "TRANSITIONS", "SessionKind", "SessionState", "TaskStatus", "Verdict", "can_move",
              "is_final"),
    "vocab": ("BUILTIN_ARGS", "BUILTIN_CMDS", "SYSTEM_CMDS", "check_cmd", "check_request_args", "validate_args"),
    "wire": ("FrameError",),
}
_WHERE = {name: module for module, names in _FROM.items() for name in names}

__all__ = [
    "BUILTIN_ARGS", "BUILTIN_CMDS", "DOWN", "FINAL", "OPEN", "SYSTEM_CMDS", "TRANSITIONS", "UP", "Ack", "Bye",
    "Cancel", "Direction", "Done", "FrameError", "Heartbeat", "Message", "MessageDecoder", "MessageError", "Out",
    "ProtocolError", "Sample", "SessionKind", "SessionState", "Start", "Stats", "Task", "TaskStatus", "Verdict",
    "can_move", "check_cmd", "check_request_args", "encode_messages", "is_final", "parse", "problem",
    "validate_args",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:  # AttributeError also lets `from hcsdk.protocol import e2e` find the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
