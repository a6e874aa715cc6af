"""Webhooks end to end against receivers on 127.0.0.1: the real API, a real batching worker with
its deliverer, the tiny model, a test-owned Redis. Signatures are checked with `standardwebhooks`."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.app import create_app
from tests.fleet_fixtures import WorkerProcess, api_config, kill_hard, make_thread_worker, worker_env, worker_processes
from tests.stack_processes import wait_until
from tests.test_events import unsigned
from tests.webhook_receiver import Receiver, new_secret
from worker import client, webhook_queue
from worker.storage import StorageConfig
from worker.webhook_config import WebhookConfig

PROMPT = "a red circle on a blue background"
PUBLIC = "http://images.example.test"


def webhook_config(secret: str, **changes) -> WebhookConfig:
    changes.setdefault("allow_loopback", True)
    changes.setdefault("timeout", 2.0)
    changes.setdefault("backoff", 0.2)
    changes.setdefault("max_backoff", 1.0)
    changes.setdefault("public_url", PUBLIC)
    return WebhookConfig(secret=secret, **changes)


@pytest.fixture
def stack(fleet_redis, queue_name, tiny_engine, tmp_path):
    """make(**webhook settings) -> (API test client, secret); a thread worker with its deliverer runs."""
    started = []

    def make(**changes):
        secret = new_secret()
        hooks = webhook_config(secret, **changes)
        storage = StorageConfig(data_dir=str(tmp_path))
        api = TestClient(create_app(api_config(fleet_redis.url, queue_name, storage=storage, webhook=hooks, public_url=PUBLIC)))
        api.__enter__()
        worker = make_thread_worker(tiny_engine, fleet_redis.url, queue_name, storage, webhook=hooks).__enter__()
        started.extend([worker, api])
        return api, secret

    yield make
    for thing in started:
        thing.__exit__(None, None, None)


def submit(api: TestClient, url: str, **fields) -> str:
    response = api.post("/v1/jobs", json={"prompt": PROMPT, "steps": 3, "webhook": url, **fields})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_webhook(api: TestClient, job_id: str, done, timeout: float = 60) -> dict:
    def check():
        body = api.get(f"/v1/jobs/{job_id}").json()
        return body if body["webhook"] and done(body["webhook"]) else None

    return wait_until(check, timeout, interval=0.1, what=f"webhook state of {job_id}")


def test_one_signed_completed_call_per_job_with_image_urls(stack):
    api, secret = stack()
    with Receiver() as receiver:
        ids = [submit(api, receiver.url, seed=i) for i in range(3)]
        finals = [wait_webhook(api, job_id, lambda w: w["delivered"]) for job_id in ids]
        time.sleep(1.0)  # nothing more may come
        calls = receiver.requests()
    assert sorted(json.loads(c.body)["id"] for c in calls) == sorted(ids)  # exactly one call per job
    verifier = Webhook(secret)
    for call in calls:
        payload = verifier.verify(call.body, call.headers)
        assert payload["status"] == "succeeded"
        assert call.headers["webhook-id"] == f"msg_{payload['id']}_completed"
        final = next(f for f in finals if f["id"] == payload["id"])
        # Signed like the status endpoint's URLs (their expiry follows the signing time)
        assert (
            [_unsigned(u) for u in payload["images"]]
            == [_unsigned(u) for u in final["images"]]
            == [f"{PUBLIC}/v1/files/{payload['id']}.png"]
        )
        delivered = api.get(payload["image_url"][len(PUBLIC) :])
        assert delivered.status_code == 200 and delivered.content.startswith(b"\x89PNG")  # its signature is valid
        # The status endpoint's JSON (the webhook state moves on after the call, so it is left out).
        assert unsigned({k: v for k, v in payload.items() if k != "webhook"}) == unsigned(
            {k: v for k, v in final.items() if k != "webhook"}
        )
        assert final["webhook"] == {
            "event": "completed",
            "attempts": 1,
            "last_status": 200,
            "delivered": True,
            "gave_up": False,
            "last_error": None,
        }
        tampered = call.body.replace(b'"succeeded"', b'"failed"')
        assert tampered != call.body
        with pytest.raises(WebhookVerificationError):
            verifier.verify(tampered, call.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(new_secret()).verify(call.body, call.headers)


def test_start_and_completed_events_when_both_are_asked_for(stack):
    api, secret = stack()
    with Receiver() as receiver:
        job_id = submit(api, receiver.url, webhook_events_filter=["start", "completed"])
        wait_webhook(api, job_id, lambda w: w["event"] == "completed" and w["delivered"])
        wait_until(lambda: len(receiver.requests()) == 2, 10, what="both events")
        time.sleep(0.5)
        ids = sorted(c.headers["webhook-id"] for c in receiver.requests())
    assert ids == [f"msg_{job_id}_completed", f"msg_{job_id}_start"]


def test_two_500s_then_200_is_three_attempts(stack):
    api, secret = stack()
    with Receiver(answers=[500, 500]) as receiver:
        job_id = submit(api, receiver.url)
        final = wait_webhook(api, job_id, lambda w: w["delivered"])
        time.sleep(0.5)
        calls = receiver.requests()
    assert [c.answered for c in calls] == [500, 500, 200]
    assert len({c.headers["webhook-id"] for c in calls}) == 1  # one message, retried
    assert calls[2].at - calls[1].at >= calls[1].at - calls[0].at - 0.1  # the wait grows (backoff)
    assert final["webhook"]["attempts"] == 3 and final["webhook"]["last_status"] == 200
    assert final["status"] == "succeeded"


def test_a_receiver_that_never_answers_gets_the_bounded_number_and_the_job_still_succeeds(stack):
    api, secret = stack(attempts=3, timeout=0.5, backoff=0.1, max_backoff=0.2)
    with Receiver(then=-5) as receiver:  # answers only after 5 s, far past the 0.5 s timeout
        job_id = submit(api, receiver.url)
        final = wait_webhook(api, job_id, lambda w: w["gave_up"], timeout=60)
        time.sleep(1.0)
        calls = receiver.requests()
    assert len(calls) == 3
    assert final["webhook"]["attempts"] == 3 and final["webhook"]["last_status"] == "timeout"
    assert final["webhook"]["delivered"] is False
    assert final["status"] == "succeeded" and final["images"]


def test_a_receiver_answering_4xx_is_not_retried(stack):
    api, secret = stack()
    with Receiver(then=410) as receiver:
        job_id = submit(api, receiver.url)
        final = wait_webhook(api, job_id, lambda w: w["gave_up"])
        time.sleep(0.8)
        assert len(receiver.requests()) == 1
    assert final["webhook"]["last_status"] == 410 and final["status"] == "succeeded"


def test_delivery_resolves_again_and_refuses_an_address_that_became_internal(fleet_redis, redis_conn, queue_name):
    """Accepted when loopback was allowed; the deliverer (loopback refused) checks again and never calls."""
    from engine.request import validate_request
    from rq import Queue
    from worker.webhook_deliverer import Deliverer
    from worker.webhook_subscription import subscribe

    secret = new_secret()
    with Receiver() as receiver:
        sub = subscribe(receiver.url, None, webhook_config(secret))
        job_id = client.enqueue(Queue(queue_name, connection=redis_conn), validate_request({"prompt": PROMPT}), webhook=sub)
        job = client.fetch_job(redis_conn, job_id)
        assert webhook_queue.notify(redis_conn, job, "completed")
        assert not webhook_queue.notify(redis_conn, job, "completed")  # once per job and event
        deliverer = Deliverer(redis_conn, queue_name, webhook_config(secret, allow_loopback=False))
        assert deliverer.poll() == 1
        wait_until(lambda: webhook_queue.status_of(redis_conn, job_id)["gave_up"], 10, what="refusal")
        deliverer.stop()
        assert receiver.requests() == []
    state = webhook_queue.status_of(redis_conn, job_id)
    assert state["last_status"] == "blocked" and "loopback" in state["last_error"]
    assert webhook_queue.pending_count(redis_conn, queue_name) == 0


def test_python_client_submits_a_webhook_and_a_killed_worker_s_delivery_arrives_once(
    fleet_redis, redis_conn, queue_name, tiny_model_dir, tmp_path, monkeypatch
):
    secret = new_secret()
    settings = {
        "SD3SERVE_WEBHOOK_SECRET": secret,
        "SD3SERVE_WEBHOOK_ALLOW_LOOPBACK": "1",
        "SD3SERVE_WEBHOOK_BACKOFF": "3",
        "SD3SERVE_WEBHOOK_TIMEOUT": "2",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    env = worker_env(tiny_model_dir, fleet_redis.url, queue_name, tmp_path, **settings)
    with Receiver(answers=[503]) as receiver, worker_processes() as procs:
        job_id = client.submit(redis_conn, prompt=PROMPT, steps=3, queue=queue_name, webhook=receiver.url)
        procs.append(WorkerProcess(env, tmp_path / "w1.log"))
        wait_until(lambda: receiver.requests(), 120, interval=0.1, what="the first attempt")
        kill_hard(procs[0])  # the delivery is pending: the retry is due in ~3 s and nobody is left
        assert client.status(redis_conn, job_id).status == "succeeded"
        assert webhook_queue.pending_count(redis_conn, queue_name) == 1
        procs.append(WorkerProcess(env, tmp_path / "w2.log"))
        wait_until(
            lambda: client.status(redis_conn, job_id).webhook["delivered"],
            120,
            interval=0.2,
            what=f"delivery after the restart:\n{procs[-1].output()}",
        )
        time.sleep(1.0)
        calls = receiver.requests()
    assert [c.answered for c in calls] == [503, 200]
    assert [c for c in calls if c.answered == 200] and len({c.headers["webhook-id"] for c in calls}) == 1
    assert Webhook(secret).verify(calls[1].body, calls[1].headers)["status"] == "succeeded"
    assert client.status(redis_conn, job_id).webhook["attempts"] == 2


def test_sd3serve_webhooks_delivers_on_its_own_and_stops_on_sigterm(fleet_redis, redis_conn, queue_name, tmp_path):
    import signal
    import subprocess
    import sys

    from engine.request import validate_request
    from rq import Queue
    from tests.stack_processes import ROOT, base_env
    from worker.webhook_subscription import subscribe

    secret = new_secret()
    env = base_env(
        SD3SERVE_REDIS_URL=fleet_redis.url,
        SD3SERVE_QUEUE=queue_name,
        SD3SERVE_WEBHOOK_SECRET=secret,
        SD3SERVE_WEBHOOK_ALLOW_LOOPBACK="1",
        SD3SERVE_DATA_DIR=str(tmp_path),
    )
    with Receiver() as receiver:
        sub = subscribe(receiver.url, None, webhook_config(secret))
        job_id = client.enqueue(Queue(queue_name, connection=redis_conn), validate_request({"prompt": PROMPT}), webhook=sub)
        assert webhook_queue.notify(redis_conn, client.fetch_job(redis_conn, job_id), "completed")
        log = open(tmp_path / "webhooks.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "sd3serve.cli", "webhooks"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_until(lambda: receiver.requests(), 60, interval=0.1, what="the delivery")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    payload = Webhook(secret).verify(receiver.requests()[0].body, receiver.requests()[0].headers)
    assert payload["id"] == job_id and payload["status"] == "queued"
    assert webhook_queue.status_of(redis_conn, job_id)["delivered"]


def test_the_readme_s_verification_snippet_accepts_our_signature_and_rejects_a_tampered_body(capsys):
    import re
    from pathlib import Path

    from worker.webhook_delivery import encode_body, signed_headers

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Webhooks and event streams") :]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    secret = new_secret()
    namespace: dict = {}
    exec(snippet.replace('"whsec_..."', repr(secret)), namespace)
    payload = encode_body({"id": "j1", "status": "succeeded", "images": ["http://x/1.png"]})
    headers = signed_headers(Webhook(secret), "msg_j1_completed", payload)
    namespace["handle"](payload.encode(), headers)
    namespace["handle"](payload.replace("j1", "j2").encode(), headers)  # tampered: returns quietly
    assert capsys.readouterr().out == "j1 succeeded ['http://x/1.png']\n"


def _unsigned(url: str) -> str:
    return url.split("?", 1)[0]
