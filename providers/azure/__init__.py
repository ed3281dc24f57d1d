"""The Azure source: managed disks of VMs through incremental snapshots (docs/azure.md)."""
