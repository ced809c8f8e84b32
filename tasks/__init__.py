"""Prefect tasks: thin, typed wrappers over the pipeline stages (``pipeline.stages``).

The same functions serve the Prefect flows (as tasks) and the DVC stages
(``python -m tasks <stage> ...`` calls each task's underlying function), so the logic exists once.
"""
import os

# Silence the telemetry call a closed network would fail on, before prefect is imported.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
