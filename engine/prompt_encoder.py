"""Prompt embeddings: the pipeline's own `encode_prompt` behind an LRU cache of texts, encoded ahead
on a host thread of their own.

A new job's prompt used to be encoded inside its first step, on the loop that drives the device:
on the H200 ~50-80 ms of mostly host time (the encoders' layers are launch-bound at a text or
two), during which every other running job waited too (call h6: ~80 ms in the first step of each
of 62 jobs, 8 % of a minute of device time at 1 req/s). `prefetch` hands the texts to a thread
that encodes them on a CUDA stream of its own while the loop keeps stepping the running batch;
the scheduler admits a request once `ready` says its texts are in (engine/scheduler.py `ready`),
and `encode` then only looks them up. Texts queued together are encoded as one batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptEmbeddings:
    """Embeddings of one (prompt, negative prompt) pair; each tensor has a batch dim of 1."""

    prompt: torch.Tensor
    pooled: torch.Tensor
    negative: torch.Tensor
    negative_pooled: torch.Tensor


@dataclass
class _Encoded:
    embeds: torch.Tensor
    pooled: torch.Tensor
    done: "torch.cuda.Event | None" = None  # on the encoding stream; None: made on the caller's stream


class PromptEncoder:
    """Prompts and negative prompts go through the same text encoders (`encode_prompt` encodes the
    negative exactly as a prompt), so the cache is keyed by text: a batch of requests with the
    usual empty negative prompt encodes "" once, not once per request as the pipeline does.
    """

    def __init__(self, pipe, max_sequence_length: int, capacity: int = 256, max_batch: int = 16) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.capacity = capacity
        self.max_batch = max_batch  # texts the thread encodes at once
        self._cache: OrderedDict[str, _Encoded] = OrderedDict()
        self._lock = threading.Lock()  # the cache, the queue and the futures
        self._queued: list[str] = []  # texts waiting for the thread
        self._pending: dict[str, Future[None]] = {}  # texts queued or being encoded
        self._thread: ThreadPoolExecutor | None = None
        self._stream: torch.cuda.Stream | None = None
        self._unseen: set[str] = set()  # encoded by the thread, not looked up yet
        self.hits = 0  # texts looked up that were encoded for an earlier request
        self.misses = 0  # texts encoded

    # -- ahead of the step loop ---------------------------------------------------------------
    def prefetch(self, pairs: list[tuple[str, str]]) -> None:
        """Encode the texts of `pairs` the cache lacks on the encoding thread (returns at once)."""
        with self._lock:
            new = [t for t in dict.fromkeys(t for pair in pairs for t in pair) if t not in self._cache and t not in self._pending]
            if not new:
                return
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="sd3serve-prompts")
            self._queued.extend(new)
            for text in new:
                self._pending[text] = Future()  # settled by the drain that encodes the text
            self._thread.submit(self._drain)

    def ready(self, pair: tuple[str, str]) -> bool:
        """Whether `encode([pair])` would not wait for the encoding thread."""
        with self._lock:
            return all(text not in self._pending or self._pending[text].done() for text in pair)

    def wait_for_all(self, timeout: float | None = None) -> None:
        """Block until every text queued so far is in (at once if none is)."""
        with self._lock:
            futures = list(dict.fromkeys(self._pending.values()))
        if futures:
            wait(futures, timeout=timeout)

    def _drain(self) -> None:
        """Encode the queued texts, `max_batch` at a time, until none is left (an earlier run may
        have taken them all)."""
        while True:
            with self._lock:
                texts, self._queued = self._queued[: self.max_batch], self._queued[self.max_batch :]
            if not texts:
                return
            self._encode_batch(texts)

    def _encode_batch(self, texts: list[str]) -> None:
        error: BaseException | None = None
        try:
            self._encode_into_cache(texts, on_side_stream=True)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for these texts
            error = exc
        with self._lock:
            settled = [self._pending.pop(text) for text in texts if text in self._pending]
        for future in settled:
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    # -- in the step loop ---------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, pairs: list[tuple[str, str]]) -> list[PromptEmbeddings]:
        texts = [text for pair in pairs for text in pair]
        with self._lock:
            waiting = list(dict.fromkeys(self._pending[t] for t in texts if t in self._pending))
        for future in waiting:
            future.result()  # re-raises what the thread raised
        with self._lock:  # taken in one go: the thread may evict what it does not hold
            entries = {text: self._cache[text] for text in texts if text in self._cache}
            for text in entries:
                self._cache.move_to_end(text)
            missing = [text for text in dict.fromkeys(texts) if text not in entries]
            first_lookups = [text for text in entries if text in self._unseen]
            self._unseen.difference_update(first_lookups)
            self.hits += len(texts) - len(missing) - len(first_lookups)
        if missing:
            entries.update(self._encode_into_cache(missing, on_side_stream=False))
        current = torch.cuda.current_stream() if self._stream is not None else None
        out = []
        for entry in {id(e): e for e in entries.values()}.values():
            if entry.done is not None and current is not None:
                current.wait_event(entry.done)  # the device waits, the host does not
                entry.embeds.record_stream(current)
                entry.pooled.record_stream(current)
        for prompt, negative in pairs:
            p, n = entries[prompt], entries[negative]
            out.append(PromptEmbeddings(p.embeds, p.pooled, n.embeds, n.pooled))
        return out

    @torch.inference_mode()
    def _encode_into_cache(self, texts: list[str], on_side_stream: bool) -> dict[str, _Encoded]:
        device = self.pipe._execution_device
        side = on_side_stream and device.type == "cuda"
        if side and self._stream is None:
            self._stream = torch.cuda.Stream(device)
        done = None
        with torch.cuda.stream(self._stream) if side else nullcontext():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=texts,
                prompt_2=None,
                prompt_3=None,
                do_classifier_free_guidance=False,
                device=device,
                num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
            if side:
                done = torch.cuda.Event()
                done.record()
        encoded = {text: _Encoded(embeds[i : i + 1], pooled[i : i + 1], done) for i, text in enumerate(texts)}
        with self._lock:
            self.misses += len(texts)
            self._cache.update(encoded)
            if on_side_stream:
                self._unseen.update(texts)
            self._evict()
        return encoded

    def _evict(self) -> None:
        """Drop the least recently used texts past `capacity` (the lock is held)."""
        while len(self._cache) > self.capacity:
            text, _ = self._cache.popitem(last=False)
            self._unseen.discard(text)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
