"""LocalChatLM: a tiny random GPT-2 from a folder behind the ChatBackend interface."""

import shutil

import pytest

from data_prep.prompts.chat_backend import ChatRequest
from data_prep.prompts.response_cache import ResponseCache


@pytest.fixture(scope="module")
def tiny_lm_dir(tiny_tokenizer_dir, tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from transformers import AutoTokenizer

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "lm"
    shutil.copytree(tiny_tokenizer_dir, out)
    # Every id the model can emit is in the tokenizer, and no id ends the reply early: a random
    # model's 6-token reply is then empty only if all six are special tokens (with the old
    # 64-id vocabulary, ids without a word and an early end made empty replies in some runs).
    config = GPT2Config(vocab_size=len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir)), n_positions=256,
                        n_embd=16, n_layer=1, n_head=2, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def test_generates_caches_and_is_seeded(tiny_lm_dir, tmp_path):
    from data_prep.prompts.local_llm import LocalChatLM

    req = ChatRequest(messages=(("system", "a red cat"), ("user", "is there a dog")),
                      temperature=0.9, max_tokens=6)
    other = ChatRequest(messages=(("user", "the boat on the river"),), temperature=0.0,
                        max_tokens=6)

    lm = LocalChatLM(str(tiny_lm_dir), ResponseCache(tmp_path / "cache"), seed=0)
    first = lm.complete_many([req, other])
    assert all(isinstance(r, str) and r for r in first)
    assert lm.stats.as_dict()["requests"] == 2 and lm.stats.cached == 0

    # Same seed, empty cache: sampling is seeded per request, so the replies repeat.
    fresh = LocalChatLM(str(tiny_lm_dir), ResponseCache(tmp_path / "other-cache"), seed=0)
    assert fresh.complete_many([req, other]) == first

    # Same cache: no generation at all.
    again = LocalChatLM(str(tiny_lm_dir), ResponseCache(tmp_path / "cache"), seed=0)
    again.model.generate = None  # any generate() call would now raise TypeError
    assert again.complete_many([req, other]) == first
    assert again.stats.cached == 2 and again.stats.requests == 0


def test_missing_folder_is_an_error(tmp_path):
    from data_prep.prompts.local_llm import LocalChatLM

    with pytest.raises(ValueError, match="local_path"):
        LocalChatLM(str(tmp_path / "nope"), ResponseCache(tmp_path / "cache"))
