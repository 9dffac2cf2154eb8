"""The channel's language, with no I/O: framing, messages, the task lifecycle, vocabularies, end-to-end
MACs, chunk manifests and safe names. Imports only the standard library (orjson and cryptography
when present).
"""

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

__all__ = [
    "BUILTIN_ARGS", "BUILTIN_CMDS", "DOWN", "FINAL", "OPEN", "SYSTEM_CMDS", "TRANSITIONS", "UP", "Ack", "Bye",
    "Cancel", "Direction", "Done", "FrameError", "Heartbeat", "Message", "MessageDecoder", "MessageError", "Out",
    "ProtocolError", "Sample", "SessionKind", "SessionState", "Start", "Stats", "Task", "TaskStatus", "Verdict",
    "can_move", "check_cmd", "check_request_args", "encode_messages", "is_final", "parse", "problem",
    "validate_args",
]
