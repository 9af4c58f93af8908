"""``GET /metrics``: the service's Prometheus metrics in the text exposition format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from hessian_service.metrics import METRICS_CONTENT_TYPE, Metrics

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    operation_id="metrics",
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics: requests, latency, batches, queue, device memory",
)
async def get_metrics(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)
