"""``/metrics``: Prometheus text exposition of the score-call counters."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import AUTH_RESPONSES, Authorized, MetricsDep

router = APIRouter(tags=["metrics"], dependencies=[Authorized], responses=AUTH_RESPONSES)


class PrometheusResponse(PlainTextResponse):
    media_type = CONTENT_TYPE_LATEST


@router.get("/metrics", response_model=str, response_class=PrometheusResponse)
def metrics(metrics: MetricsDep) -> str:
    """Per env: score requests, items, errors by kind, timeouts and a latency histogram."""
    return metrics.render()
