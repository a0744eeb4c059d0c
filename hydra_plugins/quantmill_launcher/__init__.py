"""Hydra launcher ``hydra/launcher=prefect``: each job of a sweep becomes a flow run on the Prefect server."""
