"""OpenAI's Images API against the live stack on 127.0.0.1, through the real `openai` SDK: a real
Redis, the API under uvicorn, a batching worker with the tiny model, local storage. Also `n`
images per native job, exact per image against diffusers, sharing one prompt encoding."""

from __future__ import annotations

import base64
import io
import uuid
from dataclasses import replace

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from api.app import create_app
from engine.request import validate_request
from tests.fleet_fixtures import ApiServer, api_config, make_thread_worker
from tests.test_engine_exact import ONE_LEVEL, max_diff, reference_image
from worker import keys
from worker.storage import StorageConfig

KEY = "openai-test-key"
MODEL = "tiny-sd3"


@pytest.fixture(scope="module")
def stack(fleet_redis, tiny_engine, tmp_path_factory):
    queue = f"sd3serve-openai-{uuid.uuid4().hex[:8]}"
    data = tmp_path_factory.mktemp("openai-stack")
    storage = StorageConfig(data_dir=str(data))
    app = create_app(api_config(fleet_redis.url, queue, storage=storage, api_keys=(KEY,), model_name=MODEL, images_timeout=120))
    worker = make_thread_worker(tiny_engine, fleet_redis.url, queue, storage)
    with ApiServer(app) as api, worker:
        api.data_dir = data
        api.worker = worker
        yield api


@pytest.fixture
def sdk(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_sdk_b64_json_gives_n_distinct_images_of_the_size(sdk):
    result = sdk.images.generate(
        model=MODEL,
        prompt="a red circle on a blue background",
        n=3,
        size="128x128",
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 40},
    )
    assert len(result.data) == 3
    images = [_decode(item.b64_json) for item in result.data]
    assert all(image.format == "PNG" and image.size == (128, 128) for image in images)
    pixels = [np.asarray(image).tobytes() for image in images]
    assert len(set(pixels)) == 3  # three seeds, three different images
    assert [item.model_extra["seed"] for item in result.data] == [40, 41, 42]
    assert result.size == "128x128" and result.output_format == "png"


def test_sdk_urls_download_without_a_key_and_are_signed(sdk, stack):
    result = sdk.images.generate(
        model=MODEL,
        prompt="a green square on a white background",
        n=2,
        size="64x64",
        response_format="url",
        extra_body={"steps": 2},
    )
    urls = [item.url for item in result.data]
    assert len(urls) == 2 and len(set(urls)) == 2
    for url in urls:
        response = httpx.get(url, timeout=10)  # no Authorization header: the URL is the credential
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).size == (64, 64)
        assert "signature=" in url and "expires=" in url
        tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
        assert httpx.get(tampered, timeout=10).status_code == 403
        unsigned = url.split("?")[0]
        assert httpx.get(unsigned, timeout=10).status_code == 422  # no signature: not served
    job_id = result.model_extra["id"]
    # The URL cannot be built from the job id: the same path with a made-up signature is refused.
    guess = httpx.get(f"{stack.url}/v1/files/{job_id}.png", params={"expires": 2**33, "signature": "0" * 64})
    assert guess.status_code == 403 and guess.json()["error"]["code"] == "bad_signature"


@pytest.mark.parametrize("fmt,pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_sdk_output_formats_decode_in_that_format(sdk, fmt, pil_format):
    result = sdk.images.generate(
        model=MODEL,
        prompt="a yellow triangle",
        n=1,
        size="64x64",
        response_format="b64_json",
        output_format=fmt,
        output_compression=80,
        extra_body={"steps": 2},
    )
    image = _decode(result.data[0].b64_json)
    assert image.format == pil_format and image.size == (64, 64)
    assert result.output_format == fmt


def test_models_list_and_unknown_model_gets_openai_404(sdk):
    assert [m.id for m in sdk.models.list().data] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.images.generate(model="dall-e-3", prompt="a cat")
    error = caught.value.response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
    assert error["param"] == "model" and "dall-e-3" in error["message"]


@pytest.mark.parametrize("size", ["100x100", "64x4096", "big"])
def test_bad_size_and_n_get_openai_400_naming_the_param(sdk, size):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(model=MODEL, prompt="a cat", size=size)
    error = caught.value.response.json()["error"]
    assert error["param"] == "size" and error["type"] == "invalid_request_error" and error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(model=MODEL, prompt="a cat", n=11)
    assert caught.value.response.json()["error"]["param"] == "n"


def test_wrong_key_gets_openai_401_shape(stack):
    bad = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        bad.images.generate(model=MODEL, prompt="a cat")
    assert caught.value.response.json()["error"]["code"] == "invalid_api_key"
    anonymous = httpx.post(f"{stack.url}/v1/images/generations", json={"prompt": "a cat"})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"


def test_oversized_and_malformed_bodies_get_openai_errors(stack):
    headers = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    huge = httpx.post(f"{stack.url}/v1/images/generations", content=b'{"prompt": "' + b"x" * 100_000 + b'"}', headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "invalid_request_error"
    broken = httpx.post(f"{stack.url}/v1/images/generations", content=b'{"prompt": ', headers=headers)
    assert broken.status_code == 400 and broken.json()["error"]["message"] == "the body is not valid JSON"
    extra = httpx.post(f"{stack.url}/v1/images/generations", json={"prompt": "x", "colour": "red"}, headers=headers)
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "colour"


def test_no_worker_in_time_gives_504_with_the_job_id_and_the_job_goes_on(fleet_redis, tmp_path):
    queue = f"sd3serve-noworker-{uuid.uuid4().hex[:8]}"
    app = create_app(
        api_config(fleet_redis.url, queue, storage=StorageConfig(data_dir=str(tmp_path)), model_name=MODEL, images_timeout=0.5)
    )
    with ApiServer(app) as api:
        sdk = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            sdk.images.generate(model=MODEL, prompt="a slow cat")
        assert caught.value.status_code == 504
        body = caught.value.response.json()
        assert body["error"]["code"] == "timeout" and body["error"]["type"] == "timeout_error"
        job = httpx.get(f"{api.url}/v1/jobs/{body['job_id']}").json()
        assert job["status"] == "queued"  # not lost: a worker will still run it


def test_native_job_with_n_images_is_exact_per_image_and_encodes_the_prompt_once(stack, tiny_engine, tiny_model_dir, redis_conn):
    headers = {"Authorization": f"Bearer {KEY}"}
    prompts = tiny_engine.runner.prompts
    misses_before = prompts.misses
    fields = dict(prompt="a blue square on a red background, n images", seed=77, steps=3, guidance_scale=4.0, width=64, height=64)
    created = httpx.post(f"{stack.url}/v1/jobs", json={**fields, "n": 3, "output_format": "png"}, headers=headers)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    done = httpx.get(f"{stack.url}/v1/jobs/{job_id}", params={"wait": 60}, headers=headers, timeout=70).json()
    assert done["status"] == "succeeded" and done["n"] == 3 and len(done["images"]) == 3, done
    assert done["image_url"] == done["images"][0]
    assert prompts.misses - misses_before <= 2  # the prompt (and at most the empty negative) once, not 3 times
    steps = redis_conn.xrange(keys.step_log_key(stack.worker.worker.name))
    assert max(int(fields_[b"batch_size"]) for _, fields_ in steps) >= 3  # the images ran as rows of one batch
    base = validate_request(fields)
    for i, url in enumerate(done["images"]):
        image = Image.open(io.BytesIO(httpx.get(url).content))
        by_index = httpx.get(f"{stack.url}/v1/jobs/{job_id}/image", params={"index": i}, headers=headers)
        assert by_index.content == httpx.get(url).content
        reference = reference_image(tiny_model_dir, replace(base, seed=77 + i), with_t5=True)
        assert max_diff(image, reference) <= ONE_LEVEL, f"image {i} differs from diffusers with seed {77 + i}"
    missing = httpx.get(f"{stack.url}/v1/jobs/{job_id}/image", params={"index": 3}, headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "index"


def test_native_output_format_webp(stack):
    headers = {"Authorization": f"Bearer {KEY}"}
    created = httpx.post(
        f"{stack.url}/v1/jobs",
        headers=headers,
        json={"prompt": "a white circle", "steps": 2, "output_format": "webp", "output_compression": 60},
    )
    job_id = created.json()["id"]
    done = httpx.get(f"{stack.url}/v1/jobs/{job_id}", params={"wait": 60}, headers=headers, timeout=70).json()
    assert done["status"] == "succeeded" and done["output_format"] == "webp"
    response = httpx.get(done["image_url"])
    assert response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).format == "WEBP"
    assert (stack.data_dir / "images" / f"{job_id}.webp").exists()
    bad = httpx.post(
        f"{stack.url}/v1/jobs", headers=headers, json={"prompt": "x", "output_format": "png", "output_compression": 50}
    )
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "output_compression"
