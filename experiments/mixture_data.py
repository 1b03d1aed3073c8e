"""Writes a real-data mixture from this machine's offline corpus, for trying `data.sources`
and a sub-word `data.tokenizer` end to end without a download.

    python experiments/mixture_data.py --out=$DIR [--vocab_size=4096]

writes into $DIR
    web-00000.parquet, web-00001.parquet    the corpus's prose documents ("text" column)
    code-00000.jsonl, code-00001.jsonl      its Python source ({"content": ...} per line)
    sp.model                                a SentencePiece BPE of --vocab_size ids trained
                                            on both (moejax.data.tokenizer_training)

and prints the training command of the real-data issue's acceptance run:

    python -m moejax.train --config=configs/deepseekmoe.py --workdir=W \\
      --config.data.tokenizer=sentencepiece:$DIR/sp.model \\
      --config.data.sources="parquet:$DIR/web-*.parquet@0.7,jsonl:$DIR/code-*.jsonl#content@0.3" \\
      --config.model.vocab_size=4096 --config.train.steps=50

`experiments/faults.py --data=$DIR` runs its kill and preemption scenarios on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from moejax.data import DOMAINS, DataError, build_corpus  # noqa: E402
from moejax.data.tokenizer_training import train_tokenizer  # noqa: E402

SOURCES = "parquet:{out}/web-*.parquet@0.7,jsonl:{out}/code-*.jsonl#content@0.3"


def corpus_texts(data_dir: str | None, max_bytes_per_domain: int) -> dict[str, list[str]]:
    """{domain: texts} of the offline corpus's train and validation splits together."""
    builder = build_corpus(data_dir, max_bytes_per_domain)
    texts: dict[str, list[str]] = {name: [] for name in DOMAINS}
    for split in ("train", "validation"):
        source = builder.as_data_source(split=split)
        for i in range(len(source)):
            record = source[i]
            texts[DOMAINS[int(record["domain"])]].append(record["text"].decode("utf-8"))
    return texts


def write_mixture(out: str, texts: dict[str, list[str]], files: int = 2) -> None:
    """Prose as parquet "web" shards, code as jsonl "code" shards (field "content")."""
    os.makedirs(out, exist_ok=True)
    for k in range(files):
        web = texts["prose"][k::files]
        pq.write_table(pa.table({"text": web}), os.path.join(out, f"web-{k:05d}.parquet"))
        with open(os.path.join(out, f"code-{k:05d}.jsonl"), "w") as f:
            f.writelines(json.dumps({"content": t}) + "\n" for t in texts["code"][k::files])


def command(out: str, vocab_size: int, workdir: str = "W") -> str:
    return (
        f"python -m moejax.train --config=configs/deepseekmoe.py --workdir={workdir} "
        f"--config.data.tokenizer=sentencepiece:{out}/sp.model "
        f'--config.data.sources="{SOURCES.format(out=out)}" '
        f"--config.model.vocab_size={vocab_size} --config.train.steps=50"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="directory to write the files into")
    p.add_argument("--vocab_size", type=int, default=4096, help="SentencePiece ids")
    p.add_argument("--data_dir", default=None, help="where the offline corpus is built")
    p.add_argument("--max_bytes_per_domain", type=int, default=4_000_000)
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    texts = corpus_texts(args.data_dir, args.max_bytes_per_domain)
    write_mixture(out, texts)
    try:
        spec = train_tokenizer(
            texts["prose"] + texts["code"],
            kind="sentencepiece",
            vocab_size=args.vocab_size,
            out_dir=out,
        )
    except DataError as e:  # names --vocab_size and the range that trains
        print(f"mixture_data: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(texts['prose'])} web and {len(texts['code'])} code documents, {spec}")
    print(command(out, args.vocab_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
