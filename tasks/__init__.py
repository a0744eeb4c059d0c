"""Prefect tasks: one per pipeline step, each a thin wrapper around ``quantmill.execute.run_step``."""
