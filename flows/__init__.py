"""Prefect flows: composition of tasks, parameters and artifacts. No I/O logic here."""
