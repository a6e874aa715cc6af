"""Prompt encoding for training, exactly as StableDiffusion3Pipeline.encode_prompt does it:
both CLIPs' penultimate hidden states side by side (zero-padded to the joint width), the T5's
`max_sequence_length` outputs after them, and the two CLIP pooled projections."""

from __future__ import annotations

import torch
from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase, T5EncoderModel


class TextBatcher:
    """Token ids of a fixed caption set (plus the empty prompt) for the three tokenizers, kept
    on the training device, padded and truncated as the pipeline does."""

    def __init__(self, tokenizers: list[PreTrainedTokenizerBase], captions: list[str], t5_len: int, device: str) -> None:
        self.captions = list(captions) + [""]
        self._index = {c: i for i, c in enumerate(self.captions)}
        self.empty_index = self._index[""]
        lengths = [tokenizers[0].model_max_length, tokenizers[1].model_max_length, t5_len]
        self._ids = [self._tokenize(t, n, device) for t, n in zip(tokenizers, lengths)]

    def _tokenize(self, tok: PreTrainedTokenizerBase, length: int, device: str) -> torch.Tensor:
        return tok(
            self.captions, padding="max_length", max_length=length, truncation=True, add_special_tokens=True, return_tensors="pt"
        ).input_ids.to(device)

    def index(self, caption: str) -> int:
        return self._index[caption]

    def ids(self, rows: torch.Tensor) -> list[torch.Tensor]:
        return [ids[rows] for ids in self._ids]


def encode_tokens(
    encoders: tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel],
    ids: list[torch.Tensor],
    joint_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    enc1, enc2, enc3 = encoders
    out1 = enc1(ids[0], output_hidden_states=True)
    out2 = enc2(ids[1], output_hidden_states=True)
    clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    t5 = enc3(ids[2])[0].to(clip.dtype)
    pooled = torch.cat([out1.text_embeds, out2.text_embeds], dim=-1)
    return torch.cat([clip, t5], dim=-2), pooled
