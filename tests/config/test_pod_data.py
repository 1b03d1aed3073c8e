"""The pod configs read C4 with a sub-word tokenizer, and a missing tokenizer is answered
with the command that prepares it."""

import pytest
from testing_utils import load_config_module

from moejax.config.pod_data import C4, prepare_command, tokenizer_path


@pytest.mark.parametrize(
    "name, kind", [("dense", "sentencepiece"), ("gshard", "sentencepiece"), ("deepseekmoe", "hf")]
)
def test_pod_blocks_name_real_data_and_a_tokenizer(name, kind):
    c = load_config_module(name).get_config("size=pod")
    assert c.data.sources == C4 == "tfds:c4/en:3.1.0"
    assert c.data.tokenizer.startswith(f"{kind}:{tokenizer_path()}")
    assert c.model.vocab_size >= 32768  # the published / trained vocabularies fit
    assert prepare_command(c.data.tokenizer) is not None


def test_prepare_command():
    sp = f"sentencepiece:{tokenizer_path('c4_en_sp32768', 'sp.model')}"
    assert prepare_command(sp) == (
        "python -m moejax.data.tokenizer_train --sources=tfds:c4/en:3.1.0 --kind=sentencepiece "
        f"--vocab_size=32768 --out={tokenizer_path('c4_en_sp32768')}"
    )
    hf = prepare_command(f"hf:{tokenizer_path('deepseek-moe-16b')}")
    assert "tokenizer.json" in hf and "deepseek-ai/deepseek-moe-16b-base" in hf
    assert prepare_command("sentencepiece:/elsewhere/sp.model") is None
    assert prepare_command("byte") is None
