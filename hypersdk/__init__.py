"""hypersdk engine: disk formats, block maps, crypto, manifests, cost. Importable without Prefect."""

__version__ = "0.1.0"
