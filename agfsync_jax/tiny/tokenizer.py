"""The tiny models' CLIP tokenizer: a small byte-level BPE vocabulary written in code.

One recipe for every tiny model (the tiny SD pipelines, the tiny CLIP scorers, the benchmarks'
models), so that token ids mean the same everywhere. Typical prompt words are single tokens, so
prompts fit CLIP's 77 tokens even with a hand-made vocabulary; other text falls back to bytes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

# Words that become single BPE tokens, so that typical prompts fit in CLIP's 77 tokens even
# with a hand-made vocabulary. Everything else falls back to byte-level characters.
_WORDS = """a an the of in on at with and or to by from under over above below behind beside near
next inside between front left right top bottom one two three four five six seven eight nine ten
red orange yellow green blue purple pink brown black white gray grey gold silver golden dark light
bright pale small large big tiny huge tall short long round square old new wooden metal glass stone
plastic paper cotton leather marble ceramic cat dog bird horse cow fish rabbit fox bear lion tiger
elephant owl person man woman child girl boy people chef player runner cyclist artist robot car bus
bicycle train boat plane truck house tower bridge city street building castle church window door
table chair cup bowl plate vase lamp book clock phone computer camera bag hat shoe ball tree flower
rose tulip leaf grass plant garden forest mountain river lake sea ocean beach desert field sky cloud
sun moon star snow rain night morning sunset apple banana cake bread pizza coffee tea soup fruit
painting photo sculpture drawing style watercolor oil sketch abstract pattern shape circle triangle
sitting standing running flying holding wearing eating playing reading walking sleeping is are
there photograph of in-front detailed realistic cinematic vivid soft""".split()


def _byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table: 256 printable stand-ins for the 256 byte values."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tokenizer_files(out_dir: Path) -> int:
    """Writes vocab.json and merges.txt of a small CLIP BPE tokenizer; returns the vocab size.

    The end-of-text token gets the highest id, as in real CLIP: Flax CLIP pools at
    `argmax(input_ids)` while PyTorch CLIP pools at the first end-of-text id, and the two agree
    only under that layout.
    """
    alphabet = _byte_alphabet()
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    known = set(vocab)
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for sym in symbols[1:]:
            merge = f"{current} {sym}"
            current = current + sym
            if current not in known:
                merges.append(merge)
                vocab.append(current)
                known.add(current)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def clip_tokenizer() -> tuple[Any, int]:
    """The tiny CLIP tokenizer (transformers' CLIPTokenizer over our files) and its vocab size."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = write_tokenizer_files(Path(tmp))
        tok = CLIPTokenizer(vocab_file=f"{tmp}/vocab.json", merges_file=f"{tmp}/merges.txt",
                            pad_token="<|endoftext|>", model_max_length=77)
    return tok, vocab_size
