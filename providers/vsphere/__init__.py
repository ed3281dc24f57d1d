"""The vSphere provider (pyvmomi): connection, inventory, snapshots, CBT, download, NFC export.

providers/sources/vsphere.py registers ``VSphereSource`` for the ``vsphere://`` scheme; see
docs/vsphere.md.
"""
