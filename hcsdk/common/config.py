"""Where the SDK and CLI find a master.

Order: ``ZY_CONFIG`` (path to a client.toml), else ``ZY_MASTER`` / ``ZY_TOKEN`` / ``ZY_CA``,
else ``client.toml`` in the user's config directory (``~/.config/zy`` on Linux).
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from hcsdk.common.errors import ConfigError
from hcsdk.common.files import atomic_write

__all__ = ["ClientConfig", "load_client_config", "user_config_path", "write_client_config"]


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    url: str
    token: str
    ca: str | None = None


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
    try:
        url, token = str(data["url"]), str(data["token"])
    except KeyError as exc:
        raise ConfigError(f"client config {path} lacks the key {exc.args[0]!r}") from None
    ca = data.get("ca")
    if ca and not Path(ca).is_absolute():
        ca = str(path.parent / ca)
    return ClientConfig(url=url, token=token, ca=ca)


def load_client_config() -> ClientConfig:
    env = os.environ
    if env.get("ZY_CONFIG"):
        return _read(Path(env["ZY_CONFIG"]))
    if env.get("ZY_MASTER"):
        if not env.get("ZY_TOKEN"):
            raise ConfigError("ZY_MASTER is set but ZY_TOKEN is not")
        return ClientConfig(url=env["ZY_MASTER"], token=env["ZY_TOKEN"], ca=env.get("ZY_CA"))
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
    lines = [f"url = {json.dumps(cfg.url)}", f"token = {json.dumps(cfg.token)}"]
    if cfg.ca:
        lines.append(f"ca = {json.dumps(cfg.ca)}")
    atomic_write(path, "# written by `zy master`; used by hcsdk and the zy CLI\n" + "\n".join(lines) + "\n",
                 mode=0o600)
