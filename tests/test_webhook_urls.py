"""Webhook URLs at submit time (422 naming the field) and the address rules behind them."""

from __future__ import annotations

import ipaddress

import pytest
from fastapi.testclient import TestClient
from rq import Queue

from engine.request import RequestValidationError
from tests.webhook_receiver import new_secret
from worker import client
from worker.webhook_config import WebhookConfig
from worker.webhook_urls import refusal

PROMPT = "a red circle on a blue background"


@pytest.fixture
def make_api(make_client):
    """make(**webhook settings) -> a started API test client (a fresh secret unless given)."""

    def make(**hooks) -> TestClient:
        hooks.setdefault("secret", new_secret())
        return make_client(webhook=WebhookConfig(**hooks))

    return make


REFUSED = [
    ("ftp://8.8.8.8/hook", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("gopher://8.8.8.8:70/", "http:// or https://"),
    ("8.8.8.8/hook", "http:// or https://"),
    ("http://127.0.0.1:8000/hook", "loopback"),
    ("http://127.8.9.10/", "loopback"),
    ("http://localhost:9000/", "loopback"),
    ("http://[::1]:8000/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),  # AWS / GCP / Azure metadata
    ("http://[fe80::1]/", "link-local"),
    ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
    ("http://[fd00:ec2::254]/", "private"),  # AWS metadata over IPv6
    ("http://10.0.0.5/", "private"),
    ("http://172.16.3.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "non-public"),  # carrier-grade NAT
    ("http://0.0.0.0:80/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://user:pw@8.8.8.8/", "credentials"),
    ("http:///nohost", "no host"),
    ("http://8.8.8.8:99999/", "not a valid URL"),
]


@pytest.mark.parametrize("url, why", REFUSED)
def test_bad_webhook_urls_get_422_naming_the_field(make_api, redis_conn, queue_name, url, why):
    response = make_api().post("/v1/jobs", json={"prompt": PROMPT, "webhook": url})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "webhook" and why in error["message"], error
    assert Queue(queue_name, connection=redis_conn).count == 0


def test_a_public_address_is_accepted_and_shows_its_webhook_state(make_api):
    response = make_api().post(
        "/v1/jobs", json={"prompt": PROMPT, "webhook": "https://8.8.8.8/hook", "webhook_events_filter": ["start", "completed"]}
    )
    assert response.status_code == 202, response.text
    assert response.json()["webhook"] == {
        "event": None,
        "attempts": 0,
        "last_status": None,
        "delivered": False,
        "gave_up": False,
        "last_error": None,
    }


def test_loopback_is_allowed_only_with_the_setting(make_api):
    body = {"prompt": PROMPT, "webhook": "http://127.0.0.1:9/hook"}
    assert make_api().post("/v1/jobs", json=body).status_code == 422
    assert make_api(allow_loopback=True).post("/v1/jobs", json=body).status_code == 202
    # The setting opens loopback only, not private or metadata addresses.
    body["webhook"] = "http://169.254.169.254/"
    assert make_api(allow_loopback=True).post("/v1/jobs", json=body).status_code == 422


def test_the_allow_list_admits_only_its_hosts(make_api):
    api = make_api(allowed_hosts=("8.8.4.4", "*.hooks.example.com"))
    ok = api.post("/v1/jobs", json={"prompt": PROMPT, "webhook": "https://8.8.4.4/x"})
    refused = api.post("/v1/jobs", json={"prompt": PROMPT, "webhook": "https://8.8.8.8/x"})
    assert ok.status_code == 202, ok.text
    assert refused.status_code == 422 and "allowed webhook hosts" in refused.json()["error"]["message"]


@pytest.mark.parametrize("events", [["finished"], [], "completed", [1]])
def test_bad_event_filters_get_422_naming_the_field(make_api, events):
    response = make_api().post(
        "/v1/jobs", json={"prompt": PROMPT, "webhook": "https://8.8.8.8/", "webhook_events_filter": events}
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"].startswith("webhook_events_filter")


def test_webhooks_need_a_secret_on_the_server(make_api):
    response = make_api(secret="").post("/v1/jobs", json={"prompt": PROMPT, "webhook": "https://8.8.8.8/"})
    assert response.status_code == 422 and "SD3SERVE_WEBHOOK_SECRET" in response.json()["error"]["message"]


def test_the_python_client_checks_the_same_rules(redis_conn, queue_name, monkeypatch):
    monkeypatch.setenv("SD3SERVE_WEBHOOK_SECRET", new_secret())
    with pytest.raises(RequestValidationError) as caught:
        client.submit(redis_conn, prompt=PROMPT, queue=queue_name, webhook="http://10.1.2.3/")
    assert caught.value.field == "webhook"
    with pytest.raises(RequestValidationError) as caught:
        client.submit(redis_conn, prompt=PROMPT, queue=queue_name, webhook="https://8.8.8.8/", webhook_events_filter=["done"])
    assert caught.value.field == "webhook_events_filter"
    job_id = client.submit(redis_conn, prompt=PROMPT, queue=queue_name, webhook="https://8.8.8.8/")
    assert client.status(redis_conn, job_id).meta["webhook"] == {"url": "https://8.8.8.8/", "events": ["completed"]}


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert refusal(ipaddress.ip_address(address), allow_loopback=False) is None


def test_secret_must_be_a_standard_webhooks_secret():
    with pytest.raises(ValueError, match="Standard Webhooks"):
        WebhookConfig(secret="whsec_%%%not-base64")
