"""Tests use the library's local fleet; this keeps their imports short."""

from hcsdk.localfleet import ZY, LocalFleet, Proc, wait_for

Fleet = LocalFleet

__all__ = ["ZY", "Fleet", "LocalFleet", "Proc", "wait_for"]
