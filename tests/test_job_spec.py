"""Image jobs (`n` images, output formats): validation, what the Python client enqueues, and the
stock `worker.jobs.generate` path making all n images (real Redis, the tiny engine, real files)."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from rq.job import Job

from engine.request import MAX_SEED, RequestValidationError
from worker import client, jobs, keys
from worker.job_spec import MAX_IMAGES, split_request_id, validate_job
from worker.durable_upload import DurableUploader
from worker.storage import StorageConfig, LocalStorage, RetryPolicy


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"n": 0}, "n"),
        ({"n": MAX_IMAGES + 1}, "n"),
        ({"n": "3"}, "n"),
        ({"n": True}, "n"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
        ({"output_compression": 50}, "output_compression"),  # png is lossless: a compression would be ignored
        ({"seed": MAX_SEED, "n": 2}, "seed"),
        ({"width": 65}, "width"),
    ],
)
def test_bad_job_fields_name_the_field(fields, field):
    with pytest.raises(RequestValidationError) as caught:
        validate_job({"prompt": "a cat", **fields})
    assert caught.value.field == field and caught.value.message


def test_n_images_are_n_requests_with_consecutive_seeds():
    spec = validate_job({"prompt": "a cat", "seed": 9, "n": 3, "output_format": "webp", "output_compression": 70})
    requests = spec.image_requests("job1")
    assert [r.seed for r in requests] == [9, 10, 11]
    assert [r.request_id for r in requests] == ["job1/0", "job1/1", "job1/2"]
    assert [split_request_id(r.request_id) for r in requests] == [("job1", 0), ("job1", 1), ("job1", 2)]
    assert {r.prompt for r in requests} == {"a cat"} and spec.content_type == "image/webp"
    assert spec.job_kwargs()["n"] == 3 and spec.job_kwargs()["output_compression"] == 70
    single = validate_job({"prompt": "a cat"})
    assert single.n == 1 and "n" not in single.job_kwargs() and "output_format" not in single.job_kwargs()
    drawn = validate_job({"prompt": "a cat", "n": MAX_IMAGES})
    assert drawn.generation.seed + MAX_IMAGES - 1 <= MAX_SEED


def test_client_enqueues_n_format_and_owner(redis_conn, queue_name):
    owner = keys.owner_id("some-api-key")
    job_id = client.submit(redis_conn, prompt="a red circle", n=3, output_format="jpeg", seed=4, queue=queue_name, owner=owner)
    job = Job.fetch(job_id, connection=redis_conn)
    assert job.kwargs["n"] == 3 and job.kwargs["output_format"] == "jpeg" and job.kwargs["seed"] == 4
    info = client.status(redis_conn, job_id)
    assert info.owner == owner and info.image_keys == [] and info.image_urls == []
    with pytest.raises(RequestValidationError) as caught:
        client.submit(redis_conn, prompt="x", n=20, queue=queue_name)
    assert caught.value.field == "n"


def test_stock_generate_makes_all_n_images(tiny_engine, tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)
    uploader = DurableUploader(storage, StorageConfig(data_dir=str(tmp_path)), threads=1)
    monkeypatch.setattr(
        jobs,
        "_runtime",
        jobs._Runtime(
            engine=tiny_engine, storage=storage, key_prefix="", retry=RetryPolicy(attempts=1), progress_every=1, uploader=uploader
        ),
    )
    result = jobs.generate(prompt="a green circle", steps=2, n=3, seed=5, output_format="webp")
    assert result["n"] == 3 and [image["seed"] for image in result["images"]] == [5, 6, 7]
    job_id = result["image_key"].removesuffix(".webp")
    assert [image["key"] for image in result["images"]] == [f"{job_id}.webp", f"{job_id}-1.webp", f"{job_id}-2.webp"]
    decoded = [Image.open(io.BytesIO(storage.get(image["key"]))) for image in result["images"]]
    assert all(image.format == "WEBP" and image.size == (64, 64) for image in decoded)
    assert len({image.tobytes() for image in decoded}) == 3
