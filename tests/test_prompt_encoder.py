"""Prompts are encoded ahead on a thread (engine/prompt_encoder.py): a job whose prompt is still being
encoded waits while the running batch keeps stepping; an idle engine waits for it without a spin;
the embeddings are the pipeline's own."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import validate_request


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_config(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))


def _slow_prompts(engine, seconds: float, word: str = "slow"):
    """Make the pipeline's encoder take `seconds` longer for texts with `word`; returns a restore."""
    pipe = engine.pipe
    encode_prompt = pipe.encode_prompt
    threads: list[str] = []

    def slow(*args, **kwargs):
        threads.append(threading.current_thread().name)
        if any(word in text for text in kwargs["prompt"]):
            time.sleep(seconds)
        return encode_prompt(*args, **kwargs)

    pipe.encode_prompt = slow
    return threads, lambda: setattr(pipe, "encode_prompt", encode_prompt)


def _assert_the_pipeline_s_own(engine, pair: tuple[str, str], emb) -> None:
    """`emb` equals what the pipeline's `encode_prompt` gives for the pair, called directly."""
    with torch.inference_mode():
        want, _, pooled, _ = engine.pipe.encode_prompt(
            prompt=list(pair),
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            device=engine.pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=engine.runner.prompts.max_sequence_length,
        )
    torch.testing.assert_close(emb.prompt, want[0:1])
    torch.testing.assert_close(emb.negative, want[1:2])
    torch.testing.assert_close(emb.pooled, pooled[0:1])


def test_a_prompt_being_encoded_does_not_hold_up_the_running_batch(engine):
    threads, restore = _slow_prompts(engine, 1.0)
    try:
        fast = validate_request(dict(prompt="a fast cat", seed=1, steps=100, width=64, height=64, request_id="fast"))
        engine.add(fast)
        engine.step()  # "fast" runs
        slow = validate_request(dict(prompt="a slow dog", seed=2, steps=2, width=64, height=64, request_id="slow"))
        engine.add(slow)
        began = time.perf_counter()
        stepped = 0
        while time.perf_counter() - began < 0.3:
            report = engine.step()
            assert engine.progress("slow") == (0, 2)  # still encoding: not admitted ...
            assert report.size == (64, 64) and report.batch_size == 1  # ... while "fast" steps alone
            stepped += 1
        assert stepped >= 2, stepped
        assert "sd3serve-prompts" in " ".join(threads)  # the slow text went to the prompt thread
        finished = engine.run([])  # drives both to the end
        assert {f.request.request_id for f in finished} == {"fast", "slow"}
    finally:
        restore()


def test_an_idle_engine_waits_for_the_prompt_then_steps(engine):
    _, restore = _slow_prompts(engine, 0.3, word="patient")
    try:
        engine.add(validate_request(dict(prompt="a patient owl", seed=3, steps=2, width=64, height=64, request_id="owl")))
        began = time.perf_counter()
        report = engine.step()
        assert time.perf_counter() - began >= 0.25  # it waited for the encoding ...
        assert report.size == (64, 64) and report.batch_size == 1  # ... and then ran the step
        engine.run([])
    finally:
        restore()


def test_embeddings_from_the_thread_are_the_pipeline_s_own(engine):
    prompts = engine.runner.prompts
    pairs = [("a red square, thread", "blurry, thread"), ("a blue circle, thread", "")]
    misses = prompts.misses
    prompts.prefetch(pairs)
    got = prompts.encode(pairs)
    assert prompts.misses - misses == 3  # three new texts ("" was encoded before), each once
    for pair, emb in zip(pairs, got):
        _assert_the_pipeline_s_own(engine, pair, emb)
    hits = prompts.hits
    prompts.encode(pairs)
    assert prompts.hits - hits == 4 and prompts.misses - misses == 3  # looked up again: cached


def test_an_encoder_error_on_the_thread_fails_the_step_and_is_not_cached(engine):
    pipe = engine.pipe
    encode_prompt = pipe.encode_prompt

    def broken(*args, **kwargs):
        if any("broken" in text for text in kwargs["prompt"]):
            raise RuntimeError("the text encoder broke")
        return encode_prompt(*args, **kwargs)

    pipe.encode_prompt = broken
    try:
        engine.add(validate_request(dict(prompt="a broken lamp", seed=4, steps=2, width=64, height=64, request_id="lamp")))
        with pytest.raises(RuntimeError, match="text encoder broke"):
            while engine.has_work():
                engine.step()
        assert engine.cancel("lamp")  # as the worker does with a failed step's requests
        engine.drop_canceled()
        assert not engine.has_work()
    finally:
        pipe.encode_prompt = encode_prompt
    assert "a broken lamp" not in engine.runner.prompts._cache


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_thread_s_stream_hands_over_equal_embeddings(tiny_model_dir):
    cuda = Engine.from_config(EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16", compile="off"))
    prompts = cuda.runner.prompts
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # the main stream is busy while the thread encodes on its own
        busy = (busy @ busy).clamp_(-1, 1)
    pairs = [("a cuda cat", "a cuda negative")]
    prompts.prefetch(pairs)
    prompts.wait_for_all()
    got = prompts.encode(pairs)[0]
    assert prompts._stream is not None  # it ran on the thread's stream
    _assert_the_pipeline_s_own(cuda, pairs[0], got)
    images = cuda.generate([validate_request(dict(prompt="a cuda cat", seed=5, steps=3, width=64, height=64))])
    assert len(images) == 1


def test_a_cache_smaller_than_one_call_s_texts_still_hands_them_all_out(engine):
    from engine.prompt_encoder import PromptEncoder

    tiny = PromptEncoder(engine.pipe, engine.runner.prompts.max_sequence_length, capacity=1)
    pair = ("a cat, capacity one", "a dog, capacity one")
    tiny.prefetch([("a bird, capacity one", "")])  # the thread evicts while the loop looks up
    got = tiny.encode([pair])[0]
    _assert_the_pipeline_s_own(engine, pair, got)
    assert len(tiny._cache) <= 1


def test_one_prefetch_of_more_texts_than_a_batch_encodes_them_all(engine):
    from engine.prompt_encoder import PromptEncoder

    small = PromptEncoder(engine.pipe, engine.runner.prompts.max_sequence_length, max_batch=2)
    pairs = [(f"text {i} of a long prefetch", "") for i in range(3)]  # 4 texts, 2 a batch
    small.prefetch(pairs)
    small.wait_for_all(timeout=30)
    assert all(small.ready(pair) for pair in pairs) and small.misses == 4


def test_requests_given_together_are_encoded_as_one_batch_whatever_the_thread_s_timing(engine, monkeypatch):
    """A text's embedding can differ in its last bits with the batch it was encoded in, so `run`
    hands the texts of the requests it admits together to the thread in one go: a thread quick
    to start cannot split them (it did: `Engine.run` gave other bits from run to run)."""
    prompts = engine.runner.prompts
    batches: list[list[str]] = []
    encode_into_cache, prefetch = prompts._encode_into_cache, prompts.prefetch

    def recording(texts, on_side_stream):
        batches.append(list(texts))
        return encode_into_cache(texts, on_side_stream)

    def prefetch_then_yield(pairs):
        prefetch(pairs)
        time.sleep(0.05)  # the thread takes what is queued before the next request is added

    monkeypatch.setattr(prompts, "_encode_into_cache", recording)
    monkeypatch.setattr(prompts, "prefetch", prefetch_then_yield)
    requests = [
        validate_request(dict(prompt=f"together {i}", seed=i, steps=2, width=64, height=64, negative_prompt="apart"))
        for i in range(3)
    ]
    engine.generate(requests)
    assert batches == [["together 0", "apart", "together 1", "together 2"]]
