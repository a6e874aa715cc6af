"""CLIP tokenizers built offline from the caption vocabulary (no hub).

The vocabulary holds CLIP's 256 byte-level symbols and their end-of-word forms (so any text
tokenizes), the two special tokens, and BPE merges learned from the caption words until each
caption word is a single token.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on the word list (each word once): merge the most frequent adjacent pair,
    ties broken by the pair itself, until no word has two symbols left."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter((s[i], s[i + 1]) for s in seqs for i in range(len(s) - 1))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            merged.append(out)
        seqs = merged


def write_tokenizer(folder: str | Path, words: list[str], model_max_length: int) -> CLIPTokenizer:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = learn_merges([w.lower() for w in words])
    for a, b in merges:
        vocab_list.append(a + b)
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=model_max_length,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
    tok.save_pretrained(folder)
    return tok


def write_t5_tokenizer(folder: str | Path, words: list[str]):
    """A Unigram T5 tokenizer whose pieces are the caption words (one token each) and single
    characters (so most text still tokenizes; the saved tokenizer does not lowercase)."""
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w.lower(), -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -5.0) for c in chars]
    seen: set[str] = set()
    pieces = [p for p in pieces if not (p[0] in seen or seen.add(p[0]))]  # first score wins
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.save_pretrained(folder)
    return tok
