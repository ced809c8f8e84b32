"""Prefect flows: one per modality, plus ``reproduce`` chaining them (entrypoints of prefect.yaml)."""
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
