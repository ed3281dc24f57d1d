"""vSphere source (``vsphere://host[:port]/Datacenter/vm/path``): the registered entry point.

The implementation lives in the providers/vsphere/ package (connection, inventory, snapshots, cbt,
download, nfc); see docs/vsphere.md.
"""

from __future__ import annotations

from providers.vsphere.source import VSphereSource

SOURCE = VSphereSource

__all__ = ["SOURCE", "VSphereSource"]
