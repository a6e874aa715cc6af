"""bench/merge_calls.py: the engine files of several device calls merge into the committed one."""

from __future__ import annotations

import json

import pytest

from bench import merge_calls
from tests.bench_rows import bench_row


def _row(system: str, mode: str, size: int, batch: int, ips: float) -> dict:
    return bench_row(system, mode, size, batch, ips, steps=28)


def _run(started: str, parts: list[str], sizes: list[int]) -> dict:
    return dict(started=started, parts=parts, config=dict(sizes=sizes, batches=[1, 16]))


BASE = dict(
    card="h200",
    rows=[
        _row("diffusers", "eager", 1024, 16, 0.60),
        _row("sd3serve", "exact-fast", 1024, 16, 0.90),
        _row("sd3serve", "exact-fast", 512, 16, 3.0),
        _row("xdit", "eager", 1024, 16, 0.61),
    ],
    runs=[_run("2026-12-01T00:00:00", ["e2e"], [512, 1024])],
    diffusers_compiled=dict(warmup_seconds_per_shape={"1024_b16": 60.0}, compile_seconds_total=60.0),
    summary={},
)


def _call(base: dict, run: dict, new_rows: list[dict], **notes) -> dict:
    """What a device call returns: the committed rows it did not make again, plus its own."""
    from types import SimpleNamespace

    from bench import merge_rows

    args = SimpleNamespace(parts=tuple(run["parts"]), sizes=run["config"]["sizes"], batches=run["config"]["batches"], fp8=False)
    kept = [r for r in base["rows"] if merge_rows.keep_row(args, "sd3-medium", "sd3.5-large", "engine", r)]
    return dict(base, rows=kept + new_rows, runs=base["runs"] + [run], **notes)


def test_each_call_replaces_only_the_rows_of_its_parts_and_sizes(tmp_path):
    base_path = tmp_path / "engine_h200.json"
    base_path.write_text(json.dumps(BASE))
    first = _call(
        BASE,
        _run("2026-12-02T07:04:46", ["e2e", "diffusers-compiled"], [512]),
        [_row("sd3serve", "exact-fast", 512, 16, 3.8), _row("diffusers-compiled", "compiled", 512, 16, 3.6)],
        diffusers_compiled=dict(warmup_seconds_per_shape={"512_b1": 63.0, "512_b16": 1.0}, compile_seconds_total=64.0),
    )
    second = _call(
        BASE,  # each call starts from the committed file, not from the call before it
        _run("2026-12-02T07:21:16", ["xdit"], [1024]),
        [_row("xdit", "eager", 1024, 16, 0.68), _row("xdit-compile", "compiled", 1024, 16, 0.84)],
    )
    for name, data in (("1.json", first), ("2.json", second)):
        (tmp_path / name).write_text(json.dumps(data))

    merge_calls.main([str(base_path), str(tmp_path / "1.json"), str(tmp_path / "2.json")])

    merged = json.loads(base_path.read_text())
    found = {(r["system"], r["size"]): r["images_per_s"] for r in merged["rows"]}
    assert found == {
        ("diffusers", 1024): 0.60,  # untouched: no call measured e2e at 1024²
        ("sd3serve", 1024): 0.90,
        ("sd3serve", 512): 3.8,  # the first call's, in place of the committed 3.0
        ("diffusers-compiled", 512): 3.6,
        ("xdit", 1024): 0.68,  # the second call's, in place of 0.61
        ("xdit-compile", 1024): 0.84,
    }
    assert len(merged["rows"]) == 6
    assert [r["started"] for r in merged["runs"]] == ["2026-12-01T00:00:00", "2026-12-02T07:04:46", "2026-12-02T07:21:16"]
    warmups = merged["diffusers_compiled"]["warmup_seconds_per_shape"]
    assert warmups == {"1024_b16": 60.0, "512_b1": 63.0, "512_b16": 1.0}
    assert merged["diffusers_compiled"]["compile_seconds_total"] == 124.0
    assert merged["summary"]["exact_vs_xdit_1024"] == round(0.90 / 0.84, 3)


def test_a_call_merged_twice_or_a_missing_file_is_refused(tmp_path, capsys):
    base_path = tmp_path / "engine_h200.json"
    call = _call(BASE, _run("2026-12-02T07:27:45", ["xdit"], [1024]), [_row("xdit", "eager", 1024, 16, 0.7)])
    base_path.write_text(json.dumps(BASE))
    (tmp_path / "call.json").write_text(json.dumps(call))
    merge_calls.main([str(base_path), str(tmp_path / "call.json")])
    with pytest.raises(SystemExit, match="already merged"):
        merge_calls.main([str(base_path), str(tmp_path / "call.json")])
    with pytest.raises(SystemExit):
        merge_calls.main([str(base_path), str(tmp_path / "absent.json")])
    assert "no such file" in capsys.readouterr().err


def test_a_run_replaces_only_the_batches_it_makes():
    from bench import merge_rows
    from bench.engine_bench_args import parse_args

    rows = [
        _row("diffusers", "eager", 1024, 4, 0.66),
        _row("diffusers", "eager", 1024, 16, 0.68),
        _row("sd3serve", "exact-eager", 1024, 16, 0.69),
        _row("stability-ref", "euler-cfg-fp16", 1024, 4, 0.58),
    ]
    args = parse_args(["--parts", "e2e,stability-ref", "--sizes", "1024", "--batches", "1,16", "--eager-batches", "1"])

    def kept() -> list[tuple[str, int]]:
        return [(r["mode"], r["batch"]) for r in rows if merge_rows.keep_row(args, "sd3-medium", "sd3.5-large", "engine", r)]

    # batch 4 is not made again; the eager engine runs batch 1 only; Stability runs its own batches (1)
    assert kept() == [("eager", 4), ("exact-eager", 16), ("euler-cfg-fp16", 4)]
    args.stability_batches = [1, 4]
    assert kept() == [("eager", 4), ("exact-eager", 16)]


def test_a_calls_accuracy_and_fp8_notes_are_merged_key_by_key(tmp_path):
    base = dict(BASE, accuracy=dict(fast_vs_eager_forward_1024=0.013, fast_vs_eager_forward_512=0.011))
    base_path = tmp_path / "engine_h200.json"
    base_path.write_text(json.dumps(base))
    fp8_note = dict(warmup_seconds=dict(exact_1024=18.6, attention=42.1), fp8_linears=189)
    call = _call(
        base,
        _run("2026-12-02T13:46:42", ["e2e", "accuracy"], [1024]),
        [_row("sd3serve", "exact-fp8", 1024, 16, 1.04)],
        accuracy=dict(fast_vs_eager_forward_1024=0.014, fp8_vs_eager_forward_1024=0.015),
        fp8=fp8_note,
    )
    (tmp_path / "call.json").write_text(json.dumps(call))

    merge_calls.main([str(base_path), str(tmp_path / "call.json")])

    merged = json.loads(base_path.read_text())
    assert merged["accuracy"] == dict(
        fast_vs_eager_forward_1024=0.014, fast_vs_eager_forward_512=0.011, fp8_vs_eager_forward_1024=0.015
    )
    assert merged["fp8"] == fp8_note
