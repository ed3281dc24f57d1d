"""Deployment helpers: create the work pool and deploy prefect.yaml from this checkout."""
