"""The default tiny models speak the built-in byte tokenizer: every id they can sample
decodes to text (random weights: random text, but never ids the tokenizer lacks)."""

from __future__ import annotations

import pytest

from services.engine import LLM, SamplingParams
from services.engine import byte_tokenizer as bt
from services.engine.shapes import get_shape


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen3"])
def test_tiny_vocabulary_is_the_byte_tokenizers(shape: str) -> None:
    config = get_shape(shape)
    assert config["vocab_size"] == bt.VOCAB_SIZE
    assert (config["bos_token_id"], config["eos_token_id"]) == (bt.BOS_ID, bt.EOS_ID)


def test_hello_on_the_default_model_decodes_to_text() -> None:
    tok = bt.build_byte_tokenizer()
    llm = LLM(model="dummy:tiny-llama", num_kv_blocks=16, use_tqdm=False)
    out = llm.generate([tok.encode("Hello").ids], SamplingParams(max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0]["token_ids"]
    assert len(out) == 16 and all(t < bt.VOCAB_SIZE for t in out)
    assert tok.decode(out, skip_special_tokens=False)
