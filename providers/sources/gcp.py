"""GCP source (``gcp://PROJECT/ZONE?export_bucket=BUCKET``): the registered entry point.

The implementation lives in the providers/gcp/ package (connection, inventory, export, stream,
maps, source); see docs/gcp.md.
"""

from __future__ import annotations

from providers.gcp.source import GcpSource

SOURCE = GcpSource

__all__ = ["SOURCE", "GcpSource"]
