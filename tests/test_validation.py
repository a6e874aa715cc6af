"""Every bad request fails before any compute with a message naming the field."""

from __future__ import annotations

import math

import pytest

from worker.config import WorkerConfig
from engine.config import EngineConfig, limits_for_model, limits_from_env
from engine.request import MAX_SEED, RequestLimits, RequestValidationError, validate_request

LIMITS = RequestLimits(min_side=64, max_side=1024, max_steps=50, max_prompt_chars=100)


@pytest.mark.parametrize(
    "fields, field, fragment",
    [
        ({"width": 100}, "width", "multiple of 16"),
        ({"height": 72}, "height", "multiple of 16"),
        ({"width": 32}, "width", "between 64 and 1024"),
        ({"height": 2048}, "height", "between 64 and 1024"),
        ({"steps": 0}, "steps", "between 1 and 50"),
        ({"steps": 51}, "steps", "between 1 and 50"),
        ({"steps": 2.5}, "steps", "integer"),
        ({"guidance_scale": -1.0}, "guidance_scale", "between 0"),
        ({"guidance_scale": math.nan}, "guidance_scale", "finite"),
        ({"guidance_scale": math.inf}, "guidance_scale", "finite"),
        ({"guidance_scale": "high"}, "guidance_scale", "number"),
        ({"prompt": ""}, "prompt", "empty"),
        ({"prompt": "   "}, "prompt", "empty"),
        ({"prompt": "x" * 101}, "prompt", "limit is 100"),
        ({"prompt": 5}, "prompt", "string"),
        ({"negative_prompt": "y" * 101}, "negative_prompt", "limit is 100"),
        ({"seed": -1}, "seed", "between 0"),
        ({"seed": MAX_SEED + 1}, "seed", "between 0"),
        ({"cache_interval": 0}, "cache_interval", "between 1"),
        ({"cache_policy": "magic"}, "cache_policy", "one of"),
        ({"colour": "red"}, "colour", "unknown field"),
        ({"width": True}, "width", "integer"),
    ],
)
def test_bad_requests_name_the_field(fields, field, fragment):
    data = {"prompt": "a red circle", **fields}
    with pytest.raises(RequestValidationError) as info:
        validate_request(data, LIMITS)
    assert info.value.field == field
    assert fragment in info.value.message


def test_not_an_object():
    with pytest.raises(RequestValidationError, match="JSON object"):
        validate_request(["a"], LIMITS)  # type: ignore[arg-type]


def test_defaults_and_random_seed():
    a = validate_request({"prompt": "a"}, LIMITS)
    b = validate_request({"prompt": "a"}, LIMITS)
    assert (a.width, a.height, a.steps) == (LIMITS.default_width, LIMITS.default_height, LIMITS.default_steps)
    assert 0 <= a.seed <= MAX_SEED and a.seed != b.seed
    assert a.request_id != b.request_id
    assert validate_request({"prompt": "a", "seed": 5}, LIMITS).seed == 5


def test_limits_and_config_from_env(tmp_path):
    limits = limits_from_env({"SD3SERVE_MAX_STEPS": "12", "SD3SERVE_MAX_SIDE": "512"})
    assert (limits.max_steps, limits.max_side) == (12, 512)
    with pytest.raises(RequestValidationError):
        validate_request({"prompt": "a", "steps": 13}, limits)
    with pytest.raises(ValueError, match="SD3SERVE_MAX_BATCH"):
        EngineConfig.from_env({"SD3SERVE_MAX_BATCH": "many"})
    for bad in ("nan", "inf", "-inf"):  # a float setting that is not a number is refused by name
        with pytest.raises(ValueError, match="SD3SERVE_SHUTDOWN_GRACE.*finite"):
            WorkerConfig.from_env({"SD3SERVE_SHUTDOWN_GRACE": bad})
    with pytest.raises(ValueError, match="latent_aware"):
        EngineConfig(latent_aware="magic")
    (tmp_path / "sd3serve.json").write_text('{"width": 256, "steps": 9}')
    model_limits = limits_for_model(RequestLimits(), str(tmp_path))
    assert (model_limits.default_width, model_limits.default_steps) == (256, 9)
    assert model_limits.max_side == RequestLimits().max_side  # no configs: nothing to cap


def test_max_side_follows_the_models_position_embedding(tmp_path):
    for part, config in (
        ("transformer", '{"pos_embed_max_size": 64, "patch_size": 2}'),
        ("vae", '{"block_out_channels": [32, 64, 128, 128]}'),
    ):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(config)
    limits = limits_for_model(RequestLimits(max_side=2048), str(tmp_path))
    assert limits.max_side == 1024  # 64 patches x 2 latents x 8 pixels
    with pytest.raises(RequestValidationError, match="between 64 and 1024"):
        validate_request({"prompt": "a", "width": 1040}, limits)
    assert limits_for_model(RequestLimits(max_side=512), str(tmp_path)).max_side == 512
