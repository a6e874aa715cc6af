"""bench/load_test.py: the arrival plan, the numbers it reports, the serving summary, and a short
smoke run against `sd3serve up` on the reference model (CPU) in which nothing may be lost."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

from bench.load_stats import JobRecord, percentile, summarize
from bench.load_test import LoadConfig, arrival_plan, main
from bench.serving_summary import main as serving_main
from bench.serving_summary import summarize as serving_summary
from tests.stack_processes import ROOT, base_env, free_port, wait_until


def test_arrival_plan_is_seeded_poisson_and_capped():
    config = LoadConfig(rate=5.0, duration_s=200.0, max_seconds=300.0, seed=1)
    plan = arrival_plan(config)
    assert plan == arrival_plan(config)  # every system sees the same arrivals and prompts
    assert plan != arrival_plan(LoadConfig(rate=5.0, duration_s=200.0, max_seconds=300.0, seed=2))
    assert 900 < len(plan) < 1100  # ~rate x duration
    gaps = [b[0] - a[0] for a, b in zip(plan, plan[1:])]
    assert abs(sum(gaps) / len(gaps) - 0.2) < 0.02  # exponential gaps with mean 1/rate
    assert all(0 < t < 200 for t, *_ in plan)
    capped = arrival_plan(LoadConfig(rate=5.0, duration_s=200.0, max_seconds=300.0, max_requests=7))
    assert len(capped) == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rate=1.0, concurrency=2), "either a rate"),
        (dict(), "either a rate"),
        (dict(rate=1.0, duration_s=60, max_seconds=30), "max_seconds"),
        (dict(rate=1.0, sizes=(100,)), "multiples of 16"),
    ],
)
def test_load_config_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoadConfig(**kwargs)


def test_cli_reports_bad_settings_as_an_error(capsys):
    assert main(["--rate", "1", "--concurrency", "2"]) == 2
    assert "error:" in capsys.readouterr().err


def _record(submit: float, status: str, finished: float | None = None, image: int = 100, size: int = 64) -> JobRecord:
    return JobRecord(
        size=size,
        submit=submit,
        job_id=f"j{submit}",
        status=status,
        created=submit,
        started=submit + 0.5 if finished else None,
        finished=finished,
        image_bytes=image,
    )


def test_summary_counts_lost_jobs_and_percentiles():
    records = [_record(float(i), "succeeded", i + 2.0) for i in range(10)]
    records += [
        _record(20.0, "succeeded", 22.0, image=0),  # succeeded without an image: lost
        _record(21.0, "unfinished"),
        _record(22.0, "failed", 23.0),
    ]
    s = summarize(records, rejected=1, duration_s=30, mode="open", t0=0.0)
    assert (s["submitted"], s["completed"], s["lost"], s["failed"], s["rejected"]) == (13, 10, 2, 1, 1)
    assert s["p50_s"] == 2.0 and s["queue_wait_s"] == 0.5
    assert s["images_per_min"] == pytest.approx(60 * 10 / 11, abs=1e-3)  # first submit at 0, last image at 11
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 100) == 4 and percentile([], 50) is None


def test_closed_loop_throughput_leaves_out_the_start_up_fill_and_the_drain():
    # waves of 4 images at 10, 20, 30 and 40 s, sending stops at 45 s: the first wave (the fill) and
    # images after the window don't count, so 12 images over the 35 s from the first finish
    records = [_record(0.0, "succeeded", t) for t in (10.0, 20.0, 30.0, 40.0, 50.0) for _ in range(4)]
    s = summarize(records, rejected=0, duration_s=45.0, mode="closed", t0=0.0)
    assert s["images_per_min"] == pytest.approx(60 * 12 / 35, abs=1e-3)


def _row(system, mode, rate, per_min, p95, lost=0, size="1024"):
    return dict(
        system=system,
        size=size,
        mode=mode,
        rate_per_s=rate,
        images_per_min=per_min,
        p95_s=p95,
        lost=lost,
        duplicates=0,
        by_size={},
        completed=1,
    )


def test_serving_summary_ratios():
    rows = [
        _row("rq-diffusers-compiled", "closed", None, 40.0, 3.0),
        _row("rq-diffusers-compiled", "open", 0.5, 29.0, 5.0),  # 97 % of 30/min: sustained
        _row("rq-diffusers-compiled", "open", 0.6, 33.0, 9.0),  # 92 % of 36/min: not sustained
        _row("sd3serve-exact", "closed", None, 60.0, 9.0),
        _row("sd3serve-k3", "closed", None, 80.0, 9.0),
        _row("sd3serve-k3", "open", 0.5, 30.0, 1.5),
    ]
    data = dict(
        rows=rows,
        systems={"sd3serve@x": dict(offline=dict(runs=[dict(size=1024, cache_interval=1, images_per_s=1.0, batch=16)]))},
    )
    s = serving_summary(data)
    assert s["throughput_ratio_exact_1024"] == 1.5 and s["throughput_ratio_cached_1024"] == 2.0
    assert s["baseline_sustained_rate_1024"] == 0.5 and s["p95_ratio_at_baseline_capacity"] == 0.3
    assert s["worker_efficiency"] == 1.0 and s["lost_total"] == 0


def test_mixed_run_is_compared_with_single_size_runs_at_half_its_rate():
    mixed = _row("sd3serve-exact", "open", 1.0, 62.0, 5.0) | dict(
        size="512+1024",
        completed=62,
        by_size={"512": dict(completed=32, p95_s=2.0), "1024": dict(completed=30, p95_s=6.0)},
    )
    rows = [
        mixed,
        _row("sd3serve-exact", "open", 0.5, 30.0, 0.5) | dict(size="512"),  # 0.5 req/s of 512² jobs
        _row("sd3serve-exact", "open", 0.9, 54.0, 1.0) | dict(size="512"),
        _row("sd3serve-exact", "open", 0.533, 32.0, 3.0),  # 1024²: the nearest rate above 0.5
        _row("sd3serve-exact", "open", 0.333, 20.0, 2.0),
    ]
    s = serving_summary(dict(rows=rows, systems={}))
    # Half the run's rate, not the window's realised split (32 of 62 would ask for >= 0.516 req/s).
    assert s["mixed_p95_vs_single_sd3serve-exact_512_at_1.0"] == 4.0
    assert s["mixed_p95_vs_single_sd3serve-exact_1024_at_1.0"] == 2.0
    assert s["mixed_p95_vs_single_worst"] == 4.0


def test_only_the_newest_mixed_run_counts_against_the_strictest_single_run():
    def mixed(call: str, at: str, p95_512: float) -> dict:
        return _row("sd3serve-exact", "open", 1.0, 62.0, 5.0) | dict(
            size="512+1024",
            call=call,
            at=at,
            by_size={"512": dict(completed=32, p95_s=p95_512), "1024": dict(completed=30, p95_s=3.0)},
        )

    rows = [
        mixed("h3", "2026-12-01T18:39:28Z", 3.0),  # before a fix: superseded
        mixed("h4", "2026-12-01T20:17:57Z", 1.2),
        _row("sd3serve-exact", "open", 0.5, 30.0, 0.64) | dict(size="512", call="h2"),
        _row("sd3serve-exact", "open", 0.5, 30.0, 0.6) | dict(size="512", call="h5"),
        _row("sd3serve-exact", "open", 0.5, 30.0, 2.0) | dict(call="b"),
    ]
    trial = mixed("h7", "2026-12-02T09:00:00Z", 9.0) | dict(system="sd3serve-exact+lead10")
    trial_single = _row("sd3serve-exact+lead10", "open", 0.5, 30.0, 0.5) | dict(size="512", call="h8")
    rows += [trial, trial_single]
    s = serving_summary(dict(rows=rows, systems={}))
    assert s["mixed_p95_vs_single_sd3serve-exact+lead10_512_at_1.0"] == 18.0  # a trial: reported only
    assert s["mixed_p95_vs_single_sd3serve-exact_512_at_1.0_h3"] == 5.0  # kept, not counted
    assert s["mixed_p95_vs_single_sd3serve-exact_512_at_1.0"] == 2.0  # 1.2 over h5's 0.6, not h2's 0.64
    assert s["mixed_p95_vs_single_worst"] == 2.0 and s["mixed_p95_vs_single_calls"] == ["h4"]


def test_back_to_back_device_calls_merge_into_the_committed_file(tmp_path, capsys):
    base = [_row("rq-diffusers-compiled", "closed", None, 40.0, 3.0) | dict(call="a", at="t0")]
    committed = tmp_path / "serving.json"
    committed.write_text(json.dumps(dict(card="h200", rows=base, systems={})))
    calls = []
    for name, row in (
        ("i", _row("rq-diffusers-compiled", "open", 0.5, 29.0, 5.0)),
        ("j", _row("sd3serve-k3", "open", 0.5, 30.0, 1.5)),
    ):
        copy = tmp_path / f"{name}.json"
        copy.write_text(json.dumps(dict(card="h200", rows=base + [row | dict(call=name, at="t1")], systems={f"x@{name}": {}})))
        calls.append(copy)
    assert serving_main([str(committed), *map(str, calls), str(calls[0])]) == 0  # a copy named twice adds nothing
    merged = json.loads(committed.read_text())
    assert [r.get("call") for r in merged["rows"]] == ["a", "i", "j"]
    assert set(merged["systems"]) == {"x@i", "x@j"}
    assert merged["summary"]["p95_ratio_at_baseline_capacity"] == 0.3
    assert "1 -> 3 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        serving_main([str(committed), str(tmp_path / "missing.json")])
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_load_test_against_sd3serve_up_on_the_reference_model_loses_nothing(tmp_path):
    log_path = tmp_path / "up.log"
    redis_port = free_port()  # nothing answers here, so `up` starts its own redis-server
    with open(log_path, "w+") as log:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sd3serve.cli",
                "up",
                "--port",
                "0",
                "--data-dir",
                str(tmp_path / "data"),
                "--redis-url",
                f"redis://127.0.0.1:{redis_port}/0",
                "--device",
                "cpu",
                "--quiet",
            ],
            cwd=ROOT,
            env=base_env(OMP_NUM_THREADS="1"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:

            def url() -> str | None:
                assert up.poll() is None, log_path.read_text()
                found = re.search(r"sd3serve is up: (http://\S+)", log_path.read_text())
                return found.group(1) if found else None

            base = wait_until(url, 180, interval=0.2, what="`sd3serve up` to report its URL")
            redis_url = re.search(r"Redis (redis://127.0.0.1:\d+/\d+)", log_path.read_text()).group(1)
            common = [
                "--url",
                base,
                "--size",
                "64",
                "--steps",
                "4",
                "--guidance",
                "3",
                "--max-seconds",
                "120",
                "--redis-url",
                redis_url,
            ]
            for name, mode in (
                ("open", ["--rate", "2", "--duration", "3"]),
                ("closed", ["--concurrency", "2", "--duration", "3"]),
            ):
                out = tmp_path / f"{name}.json"
                assert main([*common, *mode, "--out", str(out)]) == 0, log_path.read_text()[-3000:]
                result = json.loads(out.read_text())
                s = result["summary"]
                assert s["submitted"] >= 2 and s["completed"] == s["submitted"], s
                assert s["lost"] == 0 and s["duplicates"] == 0 and s["failed"] == 0 and s["rejected"] == 0, s
                assert all(job["image_bytes"] > 0 and job["finished"] >= job["submit"] for job in result["jobs"])
                assert s["p95_s"] >= s["p50_s"] > 0 and s["images_per_min"] > 0
        finally:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()


def test_serving_cli_reads_per_mode_rates():
    from bench.serving import open_loop_rates, parse_args, sweep_modes

    args = parse_args(["--system", "sd3serve", "--out", "x.json", "--mode-rates", "3=0.6,1.1;1=0.9"])
    assert args.mode_rates == {3: [0.6, 1.1], 1: [0.9]} and args.size == [1024]
    assert sweep_modes(args) == [("sd3serve-k3", 3), ("sd3serve-exact", 1)]
    assert open_loop_rates(args, 3) == [0.6, 1.1] and open_loop_rates(args, 1) == [0.9]
    plain = parse_args(["--system", "sd3serve", "--out", "x.json", "--rates", "0.5", "--cache-intervals", "1"])
    assert sweep_modes(plain) == [("sd3serve-exact", 1)] and open_loop_rates(plain, 1) == [0.5]
    baseline = parse_args(["--system", "rq-diffusers-compiled", "--out", "x.json", "--rates", "0.5,0.6"])
    assert sweep_modes(baseline) == [("rq-diffusers-compiled", 1)] and open_loop_rates(baseline, 1) == [0.5, 0.6]
    with pytest.raises(SystemExit):
        sweep_modes(parse_args(["--system", "sd3serve", "--out", "x.json", "--mode-rates", "2=0.5"]))


def test_serving_cli_worker_settings_name_their_rows():
    from bench.serving import parse_args, sweep_modes

    base = ["--system", "sd3serve", "--out", "x.json", "--cache-intervals", "3"]
    trial = parse_args(base + ["--worker-env", "SD3SERVE_MIN_FRESH_PER_STEP=0", "--variant", "floor0"])
    assert trial.worker_env == {"SD3SERVE_MIN_FRESH_PER_STEP": "0"}
    assert sweep_modes(trial) == [("sd3serve-k3+floor0", 3)]  # not mixed into the default rows
    assert parse_args(base).worker_env == {} and sweep_modes(parse_args(base)) == [("sd3serve-k3", 3)]
    for bad in (["--worker-env", "SD3SERVE_MIN_FRESH_PER_STEP=0"], ["--worker-env", "PATH=/x", "--variant", "v"]):
        with pytest.raises(SystemExit):
            parse_args(base + bad)
    with pytest.raises(SystemExit):
        parse_args(["--system", "sd3serve", "--out", "x.json", "--mode-rates", "3"])


def test_queue_sim_sees_queueing_only_near_capacity():
    from bench.queue_sim import window

    light = [window(0.1, 120, service=1.5, extra=0.3, seed=s) for s in range(20)]
    near = [window(0.63, 120, service=1.5, extra=0.3, seed=s) for s in range(20)]
    light_median, near_median = (sorted(p for p, _ in runs)[10] for runs in (light, near))
    assert light_median < 3.0  # about one service time: little queues
    assert near_median > 3 * light_median  # at 95 % of capacity the queue builds
