"""CUDA graphs of the text encoders (engine/text_graphs.py): equal embeddings, fresh inputs on every
replay, and nothing wrapped off CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import load_pipeline
from engine.speed import SpeedOptions
from engine.text_graphs import TextEncoderGraphs, _clone_output


def test_text_encoders_on_the_cpu_are_left_as_they_are(tiny_model_dir):
    pipe = load_pipeline(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    forwards = [pipe.text_encoder.forward, pipe.text_encoder_2.forward, pipe.text_encoder_3.forward]
    assert TextEncoderGraphs().install(pipe) == 0
    assert [pipe.text_encoder.forward, pipe.text_encoder_2.forward, pipe.text_encoder_3.forward] == forwards
    engine = Engine(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"), pipe)
    assert engine.text_graphs is None and "text_encoder_graphs" not in engine.speed_applied
    with pytest.raises(ValueError, match="max_texts"):
        TextEncoderGraphs(max_texts=0)


def test_a_replayed_output_is_a_copy_of_the_graph_s_buffers():
    static = BaseModelOutput(last_hidden_state=torch.ones(1, 3), hidden_states=(torch.zeros(1, 3), torch.ones(1, 3)))
    copy = _clone_output(static)
    assert type(copy) is BaseModelOutput and copy.attentions is None
    static.last_hidden_state.add_(1)
    static.hidden_states[1].add_(1)  # the next replay rewrites the buffers ...
    assert copy[0].tolist() == [[1.0, 1.0, 1.0]] and copy.hidden_states[1].tolist() == [[1.0, 1.0, 1.0]]  # ... not the copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_text_encoders_give_the_same_embeddings_for_every_new_prompt(tiny_model_dir):
    config = EngineConfig(model=str(tiny_model_dir), device="cuda", dtype="bfloat16", compile="off")
    graphed = Engine(config, load_pipeline(config), speed=SpeedOptions(text_compile=True, cuda_graphs=True))
    plain = Engine(config, load_pipeline(config), speed=SpeedOptions(text_compile=True))
    assert graphed.text_graphs is not None and graphed.speed_applied["text_encoder_graphs"] == 3
    graphed.warm_up()
    plain.warm_up()
    graphs = graphed.text_graphs
    assert not graphs.failed
    captured = len(graphs.captured)
    assert captured >= 3 * graphs.max_texts  # every encoder at 1..max_texts texts, before serving
    for pairs in ([("a red cat", "")], [("a blue dog", "blurry")], [("one", ""), ("two", ""), ("three", "")]):
        want, got = plain.runner.prompts.encode(pairs), graphed.runner.prompts.encode(pairs)
        for a, b in zip(want, got):
            for name in ("prompt", "pooled", "negative", "negative_pooled"):
                torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
    assert len(graphs.captured) == captured and not graphs.failed  # replays only
    first, second = graphed.runner.prompts.encode([("a red cat", ""), ("a blue dog", "")])
    assert not torch.equal(first.prompt, second.prompt)
