"""The JSON a job's status is shown as: the body of `GET /v1/jobs/{id}`, of webhook deliveries and
of the event stream's final event, built in one place so they cannot drift apart."""

from __future__ import annotations

from typing import Any

from pydantic_core import to_jsonable_python

from worker.client import JobInfo


def status_body(info: JobInfo, image_urls: list[str]) -> dict[str, Any]:
    """The status fields of `info`; `image_urls` are where clients fetch its images (empty until
    it succeeded)."""
    result = info.result or {}
    body = {
        "id": info.id,
        "status": info.status,
        "queue_position": info.queue_position,
        "progress": info.progress,
        "created_at": info.created_at,
        "started_at": info.started_at,
        "finished_at": info.finished_at,
        "seed": info.seed,
        "n": int(info.request.get("n", 1)),
        "output_format": result.get("output_format", info.request.get("output_format", "png")),
        "request": info.request,
        "image_url": image_urls[0] if image_urls else None,
        "images": list(image_urls),
        "timings": result.get("timings"),
        "error": info.error,
    }
    if info.webhook is not None:
        body["webhook"] = info.webhook
    return body


def to_json(body: dict[str, Any]) -> Any:
    """JSON-ready values, datetimes written the way the API's pydantic models write them."""
    return to_jsonable_python(body)
