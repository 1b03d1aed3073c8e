"""The real data of the `size=pod` configs: C4 and a sub-word tokenizer, both prepared
before the run (nothing is downloaded at run time).

C4 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", the corpus MaxText's examples train on) is read from
`data.data_dir` as the tfds dataset `c4/en:3.1.0`, prepared in array_record format:

    tfds build c4/en:3.1.0 --data_dir=DATA_DIR --file_format=array_record

(or copy a prepared `c4/en/3.1.0` directory there). The tokenizer file lives under
`~/.cache/moejax/tokenizers` unless `--config.data.tokenizer` points elsewhere; a missing
one stops the run in preflight with the command that trains it
(`python -m moejax.data.tokenizer_train`) or the place to put a published one.
"""

from __future__ import annotations

import os

C4 = "tfds:c4/en:3.1.0"
TOKENIZER_DIR = os.path.join("~", ".cache", "moejax", "tokenizers")


def tokenizer_path(*parts: str) -> str:
    """A file or directory under the tokenizer cache, `~` expanded."""
    return os.path.expanduser(os.path.join(TOKENIZER_DIR, *parts))


def c4_sentencepiece(vocab_size: int) -> dict:
    """`data` fields for C4 with a SentencePiece BPE of `vocab_size` ids trained on C4 by
    `python -m moejax.data.tokenizer_train --sources=tfds:c4/en:3.1.0 --kind=sentencepiece
    --vocab_size=N --out=~/.cache/moejax/tokenizers/c4_en_spN`."""
    path = tokenizer_path(f"c4_en_sp{vocab_size}", "sp.model")
    return {"sources": C4, "tokenizer": f"sentencepiece:{path}"}


def c4_hf_tokenizer(name: str) -> dict:
    """`data` fields for C4 with a published Hugging Face tokenizer: the directory
    ~/.cache/moejax/tokenizers/NAME holding its tokenizer.json (e.g. the files of
    deepseek-ai/deepseek-moe-16b-base, copied there)."""
    return {"sources": C4, "tokenizer": f"hf:{tokenizer_path(name)}"}


def prepare_command(tokenizer: str) -> str | None:
    """The command that prepares the tokenizer a pod config names (None for any other
    `data.tokenizer`): training the C4 SentencePiece model, or where to put DeepSeek's."""
    kind, _, path = tokenizer.partition(":")
    root = tokenizer_path()
    if not path.startswith(root + os.sep):
        return None
    name = os.path.relpath(path, root).split(os.sep)[0]
    if kind == "sentencepiece" and name.startswith("c4_en_sp"):
        size = name[len("c4_en_sp") :]
        return (
            f"python -m moejax.data.tokenizer_train --sources={C4} --kind=sentencepiece "
            f"--vocab_size={size} --out={os.path.join(root, name)}"
        )
    if kind == "hf":
        return (
            f"copy the model's tokenizer.json and tokenizer_config.json into {path} (e.g. "
            f"from a local copy of the Hugging Face checkpoint deepseek-ai/{name}-base)"
        )
    return None
