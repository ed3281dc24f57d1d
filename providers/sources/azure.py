"""Azure source (``azure://SUBSCRIPTION-ID/RESOURCE_GROUP``): the registered entry point.

The implementation lives in the providers/azure/ package (connection, inventory, snapshots,
pages, source); see docs/azure.md.
"""

from __future__ import annotations

from providers.azure.source import AzureSource

SOURCE = AzureSource

__all__ = ["SOURCE", "AzureSource"]
