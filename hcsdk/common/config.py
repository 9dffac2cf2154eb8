"""Where the SDK and CLI find a master.

Order: ``ZY_CONFIG`` (path to a client.toml), else ``ZY_MASTER`` / ``ZY_TOKEN`` / ``ZY_CA``,
else ``client.toml`` in the user's config directory (``~/.config/zy`` on Linux).

A control plane may have several masters: ``urls`` lists every master's URL, the preferred
first, and the SDK moves to the next one when it cannot connect. client.toml keeps ``url`` (the
first) beside ``urls`` so that older readers still find a master; a file with only ``url`` is
one URL. ``ZY_MASTER`` may hold several URLs separated by commas.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcsdk.common.errors import ConfigError
from hcsdk.common.files import atomic_write

__all__ = ["ClientConfig", "load_client_config", "parse_urls", "user_config_path", "write_client_config"]


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """``url`` is the preferred master, ``urls`` every master (``url`` first). Either may be
    given: ``ClientConfig(url=U)`` means ``urls == (U,)``; ``ClientConfig(urls=(A, B))`` means
    ``url == A``; a ``url`` missing from ``urls`` is put in front of them."""

    url: str = ""
    token: str
    ca: str | None = None
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        urls = tuple(dict.fromkeys(u for u in ((self.url,) if self.url else ()) + tuple(self.urls)))
        if not urls:
            raise ConfigError("a client config needs a master URL (url or urls)")
        # frozen: the normal form is set once, here
        object.__setattr__(self, "urls", urls)
        object.__setattr__(self, "url", urls[0])


def parse_urls(value: str | Iterable[str], what: str) -> tuple[str, ...]:
    """Master URLs from a comma-separated string or a list: blanks dropped, duplicates kept once,
    trailing slashes removed; each must be an http(s) URL. ``what`` names the source in errors."""
    items = value.split(",") if isinstance(value, str) else list(value)
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{what}: a master URL must be a string, got {item!r}")
        url = item.strip().rstrip("/")
        if not url:
            continue
        if not url.startswith(("https://", "http://")):
            raise ConfigError(f"{what}: {url!r} is not a master URL (expected https://HOST:PORT)")
        if url not in urls:
            urls.append(url)
    if not urls:
        raise ConfigError(f"{what} names no master URL")
    return tuple(urls)


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "zy" / "client.toml"


def _read(path: Path) -> ClientConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"client config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"client config {path} is not valid TOML: {exc}") from None
    if "token" not in data:
        raise ConfigError(f"client config {path} lacks the key 'token'")
    ca = data.get("ca")
    if ca and not Path(ca).is_absolute():
        ca = str(path.parent / ca)
    return ClientConfig(urls=_file_urls(path, data), token=str(data["token"]), ca=ca)


def _file_urls(path: Path, data: dict[str, Any]) -> tuple[str, ...]:
    # `urls` is the whole list when present; `url` is what older writers (and readers) know
    if "urls" in data:
        if not isinstance(data["urls"], list):
            raise ConfigError(f"client config {path}: 'urls' must be a list of URLs, got {data['urls']!r}")
        return parse_urls(data["urls"], f"client config {path} ('urls')")
    if "url" not in data:
        raise ConfigError(f"client config {path} lacks the key 'url' (or 'urls')")
    return parse_urls([str(data["url"])], f"client config {path} ('url')")


def load_client_config() -> ClientConfig:
    env = os.environ
    if env.get("ZY_CONFIG"):
        return _read(Path(env["ZY_CONFIG"]))
    if env.get("ZY_MASTER"):
        if not env.get("ZY_TOKEN"):
            raise ConfigError("ZY_MASTER is set but ZY_TOKEN is not")
        return ClientConfig(urls=parse_urls(env["ZY_MASTER"], "ZY_MASTER"), token=env["ZY_TOKEN"],
                            ca=env.get("ZY_CA"))
    path = user_config_path()
    if path.exists():
        return _read(path)
    raise ConfigError(
        "no master configured: set ZY_CONFIG to a client.toml, or ZY_MASTER and ZY_TOKEN, "
        f"or start `zy master` once so it writes {path}"
    )


def write_client_config(path: Path, cfg: ClientConfig) -> None:
    """Write atomically with owner-only permissions: the file holds an admin token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"url = {json.dumps(cfg.url)}", f"urls = {json.dumps(list(cfg.urls))}",
             f"token = {json.dumps(cfg.token)}"]
    if cfg.ca:
        lines.append(f"ca = {json.dumps(cfg.ca)}")
    atomic_write(path, "# written by `zy master`; used by hcsdk and the zy CLI (urls: every master, "
                 "the preferred first; url: the first, for older readers)\n" + "\n".join(lines) + "\n",
                 mode=0o600)
