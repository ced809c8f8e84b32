from __future__ import annotations

from typing import Any

from prefect import task

from pipeline.report.document import write_report as write_report_files


@task(name="write-report", cache_policy=None)
def write_report(modality: str, params: dict[str, Any], attacks: list[str], methods: list[str]) -> tuple[str, str]:
    """Figures plus ``runs/<modality>/report.md`` and the self-contained ``report.html``; returns their paths."""
    md, page = write_report_files(modality, params, attacks, methods)
    return str(md), str(page)
