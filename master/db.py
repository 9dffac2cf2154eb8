"""Moved: the store's thread offloader is ``master.store.StoreThread`` (offload.py). This name
stays until the modules that import it (hub, dispatch, ingest, sessions) import that instead."""

from __future__ import annotations

from .store.offload import StoreThread as Db

__all__ = ["Db"]
