"""The pipeline's steps as plain functions: typed inputs in, files written into an output directory, a small
JSON-able result out. No Prefect, no store, no network beyond what the step itself is about."""
