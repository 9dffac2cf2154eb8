"""The channel's vocabularies: cmd words and the built-in commands' arguments, defined once for
the master (which checks a request before it makes a run) and the agent (which checks a task
before it runs it)."""

from __future__ import annotations

import re
from typing import Any

from .args import Arg, ArgError, validate
from .depth import MAX_DEPTH, nests_deeper
from .errors import MessageError

__all__ = ["BUILTIN_ARGS", "BUILTIN_CMDS", "CMD_RE", "MAX_ARGS_DEPTH",
           "PLUGINS", "PLUGIN_INSTALL", "PLUGIN_REMOVE", "RELEASE_FETCH",
           "RELEASE_PLACE", "RELEASE_ROLLBACK", "SCHEDULES", "SCHEDULE_CANCEL", "SCHEDULE_SET", "SYSTEM_CMDS", "UPDATE",
           "check_cmd", "check_request_args", "is_cmd_word", "validate_args"]

#: built into every agent; any other cmd word names a plugin, which the agent may or may not have
BUILTIN_CMDS = ("shell", "exec", "ping", "facts", "echo")
#: the system words the master's own code sends by name (an agent update, a release's steps)
UPDATE = "zy.update"
RELEASE_FETCH = "zy.release.fetch"
RELEASE_PLACE = "zy.release.place"
RELEASE_ROLLBACK = "zy.release.rollback"
#: the schedule words the master's reconciliation sends by name at a handshake
SCHEDULE_SET = "zy.schedule.set"
SCHEDULE_CANCEL = "zy.schedule.cancel"
#: the rest, by name for the agent that serves them (and the SDK that sends the plugin words)
PLUGIN_INSTALL = "zy.plugin.install"
PLUGIN_REMOVE = "zy.plugin.remove"
PLUGINS = "zy.plugins"
SCHEDULES = "zy.schedules"
#: what the agent itself does, on the master's signed word (plugins, updates, schedules, releases)
SYSTEM_CMDS = (PLUGIN_INSTALL, PLUGIN_REMOVE, PLUGINS, UPDATE, SCHEDULE_SET, SCHEDULE_CANCEL, SCHEDULES, RELEASE_FETCH,
               RELEASE_PLACE, RELEASE_ROLLBACK)
#: a cmd word: lowercase letters, digits and _ in dot-separated parts (at most 64 characters)
#: (\A...\Z: "$" would also match before a trailing newline)
CMD_RE = re.compile(r"\A[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*\Z")
_MAX_CMD = 64
#: a task's args sit at level 3 of its frame (the envelope, p, args), and frames nest at most
#: depth.MAX_DEPTH levels: deeper args could not be sent (e2e.canonical would refuse to sign them)
MAX_ARGS_DEPTH = MAX_DEPTH - 2

#: the built-in commands' argument schemas, checked like any plugin's before they run
BUILTIN_ARGS: dict[str, dict[str, Arg]] = {
    "shell": {"script": Arg(str, help="the script, run by `shell -c`"),
              "shell": Arg(str, default="/bin/sh", help="the shell that runs it")},
    "exec": {"argv": Arg(list, items=str, min=1, help="program and arguments as a list, not one string; no shell")},
    "ping": {},
    "facts": {},
    "echo": {"text": Arg(str, default="", help="printed back, in-process (measures the channel)")},
}


def is_cmd_word(cmd: str) -> bool:
    return len(cmd) <= _MAX_CMD and CMD_RE.fullmatch(cmd) is not None


def check_cmd(cmd: str) -> None:
    """Refuse a cmd the master must not send: an unknown system word, or no cmd word at all
    (whether an agent has the plugin is the agent's to say)."""
    if cmd.startswith("zy."):
        if cmd not in SYSTEM_CMDS:
            raise MessageError(f"unknown system cmd {cmd!r} (known: {', '.join(SYSTEM_CMDS)})")
    elif not is_cmd_word(cmd):
        raise MessageError(f"cmd {cmd!r} is not a cmd word: lowercase letters, digits and _ in dot-separated "
                           f"parts (built in: {', '.join(BUILTIN_CMDS)}; others name plugins)")


def check_request_args(cmd: str, args: dict[str, Any]) -> None:
    """The master's early check of a request's arguments (the agent validates fully, with
    :func:`validate_args`, when the task runs): each required argument of a built-in command,
    checked by its own spec in :data:`BUILTIN_ARGS`, and for every cmd a nesting that fits in a
    task's frame. For a built-in command it accepts whatever the agent's check accepts; unlike
    it, it lets unknown arguments and optional ones of the wrong type through (the agent refuses
    them when the task runs, as it always did)."""
    for name, spec in BUILTIN_ARGS.get(cmd, {}).items():
        if not spec.required:
            continue
        try:
            spec.check(name, args[name])
        except (KeyError, ArgError):
            raise MessageError(f"cmd {cmd!r} needs args.{name}, {spec.noun()}") from None
    if nests_deeper(args, MAX_ARGS_DEPTH):
        raise MessageError(f"args nest deeper than {MAX_ARGS_DEPTH} levels of objects and lists "
                           f"(a task's frame holds {MAX_DEPTH})")


def validate_args(cmd: str, args: Any) -> dict[str, Any]:
    """A built-in command's arguments checked against its schema, defaults filled in (raises
    ``args.ArgError``); the arguments of any other cmd are returned as they are (a plugin's
    schema is checked in the worker that runs it)."""
    schema = BUILTIN_ARGS.get(cmd)
    if schema is None:
        return args  # type: ignore[no-any-return]
    return validate(schema, args)
