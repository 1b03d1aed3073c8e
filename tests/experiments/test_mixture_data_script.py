"""`experiments/mixture_data.py`: a --vocab_size SentencePiece cannot train is one error line
(the tokenizer's DataError, naming the flag) and exit status 1, not a traceback. The quick
form of its documented command runs in tests/test_readme_commands.py (row `mixture`)."""

import importlib.util

from testing_utils import REPO, TEST_CORPUS_BYTES_PER_DOMAIN

spec = importlib.util.spec_from_file_location(
    "mixture_data", REPO / "experiments" / "mixture_data.py"
)
mixture_data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mixture_data)


def test_a_vocabulary_below_the_corpus_characters_is_one_error_line(
    tiny_corpus_dir, tmp_path, capsys
):
    code = mixture_data.main(
        [
            f"--out={tmp_path}",
            "--vocab_size=300",  # the test corpus has 349 distinct characters
            f"--data_dir={tiny_corpus_dir}",
            f"--max_bytes_per_domain={TEST_CORPUS_BYTES_PER_DOMAIN}",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("mixture_data: error: SentencePiece could not train --vocab_size=300")
