"""Prefect flows: `backdoor` (one generic flow over any modality) and a thin entry per modality (prefect.yaml)."""
import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
