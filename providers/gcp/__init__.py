"""The GCP source: Compute Engine instances exported through snapshot -> image -> image export
to GCS, streamed into the pipeline (docs/gcp.md)."""
