"""Prefect flows: the deployment entrypoints. Wiring only."""
