"""Prefect tasks, one per pipeline step: thin wrappers (retries, progress, artifacts) over the
engine (hypersdk/) and the providers."""
