"""GET /metrics: every gunicorn worker's counters plus the pool-wide gauges, for Prometheus."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from webhook.resources import resources
from worker.ops import gauges
from worker.telemetry import metrics

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def scrape() -> Response:
    # Built per scrape: in multiprocess mode the collector reads every process's files.
    body = gauges.render(resources(current_app).redis)
    return Response(body, mimetype=None, content_type=metrics.CONTENT_TYPE)
