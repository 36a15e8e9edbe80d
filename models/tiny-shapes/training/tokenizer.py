"""Build a small CLIP-format BPE tokenizer for the tiny-shapes world.

vocab.json + merges.txt exactly like CLIP's (byte-level symbols, `</w>` end-of-word forms), but the merges are
learned only on the world's words, so every word of the world is a single token while any other text still
tokenizes (into bytes). Saved through transformers' CLIPTokenizer so tokenizer_config.json and
special_tokens_map.json look like a Stable Diffusion 1.x export (pad = <|endoftext|>, model_max_length 77).

    python tokenizer.py --out /root/shapes-work/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter

import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by GPT-2/CLIP byte-level BPE, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {}
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on the word list (each word once) until every word is one symbol."""
    segs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        pairs = Counter()
        for s in segs.values():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda kv: (kv[1], -len(kv[0][0] + kv[0][1]), kv[0]))[0]
        merges.append(best)
        for w, s in segs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out


def build(out_dir: str) -> None:
    from transformers import CLIPTokenizer

    os.makedirs(out_dir, exist_ok=True)
    syms = byte_symbols()
    vocab_list = syms + [s + "</w>" for s in syms]
    words = world.world_words()
    merges = learn_merges(words)
    for a, b in merges:
        vocab_list.append(a + b)
    vocab_list += [BOS, EOS]
    assert len(set(vocab_list)) == len(vocab_list)
    vocab = {t: i for i, t in enumerate(vocab_list)}
    raw = os.path.join(out_dir, "_raw")
    os.makedirs(raw, exist_ok=True)
    with open(os.path.join(raw, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(raw, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    tok = CLIPTokenizer(os.path.join(raw, "vocab.json"), os.path.join(raw, "merges.txt"),
                        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS, model_max_length=MAX_LENGTH)
    tok.save_pretrained(out_dir)
    for name in ("vocab.json", "merges.txt"):
        os.remove(os.path.join(raw, name))
    os.rmdir(raw)
    check(out_dir)


def check(tok_dir: str) -> None:
    """Every world word is one token; prompts round-trip; padding is <|endoftext|> to 77."""
    import random

    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tok_dir)
    for w in world.world_words():
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids, tok.convert_ids_to_tokens(ids))
    rng = random.Random(0)
    for s in world.all_scenes()[::50]:
        p = world.paraphrase(s, rng)
        enc = tok(p, padding="max_length", max_length=MAX_LENGTH, truncation=True)
        assert len(enc.input_ids) == MAX_LENGTH
        assert enc.input_ids[0] == tok.bos_token_id
        n = len(p.replace(",", " ,").split())
        assert enc.input_ids[n + 1] == tok.eos_token_id and enc.input_ids[-1] == tok.pad_token_id, p
        assert tok.decode(enc.input_ids, skip_special_tokens=True).replace(" ,", ",") == p, p
    print(f"tokenizer ok: vocab {len(tok)} tokens, {len(world.world_words())} world words each one token, "
          f"pad {tok.pad_token!r} id {tok.pad_token_id}")


class FastIds:
    """Token ids for prompts of the world without running BPE (every word is one token); checked against CLIPTokenizer."""

    def __init__(self, tok_dir: str):
        from transformers import CLIPTokenizer

        self.tok = CLIPTokenizer.from_pretrained(tok_dir)
        self.word = {w: self.tok(w, add_special_tokens=False).input_ids[0] for w in world.world_words()}
        self.word[","] = self.tok(",", add_special_tokens=False).input_ids[0]
        self.bos, self.eos = self.tok.bos_token_id, self.tok.eos_token_id

    def __call__(self, prompt: str) -> list[int]:
        ids = [self.bos] + [self.word[w] for w in prompt.replace(",", " ,").split()] + [self.eos]
        return ids + [self.eos] * (MAX_LENGTH - len(ids))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/root/shapes-work/tokenizer")
    build(ap.parse_args().out)
