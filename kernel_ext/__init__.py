"""IPython extension for hcsdk: ``%load_ext kernel_ext``.

Registers ``%%zyrun`` / ``%zyrun``, ``%zyconnect``, ``%zyinventory`` and ``%zyrelease``; settings via
``%config ZyRun``. It holds no protocol logic: everything goes through hcsdk.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    from .magics import ZyRun
    from .release_magic import ZyRelease

    magics = ZyRun(shell=ipython)
    ipython.register_magics(magics)
    ipython.register_magics(ZyRelease(shell=ipython))
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)  # so `%config ZyRun` lists and sets it


def unload_ipython_extension(ipython: Any) -> None:
    ipython.configurables[:] = [c for c in ipython.configurables if type(c).__name__ != "ZyRun"]
