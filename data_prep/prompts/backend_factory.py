"""The chat backend named by `config.prompts.llm.backend`."""

from __future__ import annotations

import ml_collections

from data_prep.prompts.chat_backend import ChatBackend
from data_prep.prompts.llm_client import OpenAIChatClient
from data_prep.prompts.local_llm import LocalChatLM
from data_prep.prompts.response_cache import ResponseCache


def build_backend(llm: ml_collections.ConfigDict, cache_dir: str, seed: int = 0) -> ChatBackend:
    """The backend named by `config.prompts.llm.backend`, sharing one response cache.

    Only the local backend loads PyTorch, and only when it is built.
    """
    cache = ResponseCache(cache_dir)
    if llm.backend == "openai":
        return OpenAIChatClient(
            base_url=llm.base_url, model=llm.model, api_key_env=llm.api_key_env, cache=cache,
            timeout_s=llm.timeout_s, max_retries=llm.max_retries,
            max_concurrency=llm.max_concurrency, backoff_initial_s=llm.backoff_initial_s,
            backoff_max_s=llm.backoff_max_s)
    if llm.backend == "local":
        return LocalChatLM(path=llm.local_path, cache=cache, seed=seed)
    raise ValueError(f"config.prompts.llm.backend is {llm.backend!r}, expected 'openai' or 'local'")
