"""Chat completions from a transformers causal LM in a local folder (no server, no network).

Same interface and cache as the HTTP client. Sampling is seeded from the request key, so a
request gets the same reply in every run even before the cache has it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from data_prep.prompts.chat_backend import CallStats, ChatRequest, LLMError
from data_prep.prompts.response_cache import ResponseCache, request_key

log = logging.getLogger(__name__)


class LocalChatLM:
    """`ChatBackend` over `AutoModelForCausalLM.generate`; one request at a time."""

    backend_name = "local"

    def __init__(self, path: str, cache: ResponseCache, seed: int = 0, device: str = "cpu"):
        if not path or not Path(path).is_dir():
            raise ValueError(f"config.prompts.llm.local_path {path!r} is not a model folder")
        # PyTorch and transformers are imported only when a local model is used.
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.path = str(path)
        self.cache = cache
        self.seed = seed
        self.stats = CallStats()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self._device = device
        if self.tokenizer.chat_template is None:
            # Base models have no chat template; they get a plain "role: text" transcript.
            log.info("%s has no chat template: using a plain role-prefixed transcript", path)

    def _encode(self, request: ChatRequest):
        messages = [{"role": role, "content": content} for role, content in request.messages]
        if self.tokenizer.chat_template is not None:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     return_tensors="pt")
        else:
            transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = self.tokenizer(transcript, return_tensors="pt").input_ids
        return ids.to(self._device)

    def _generate(self, request: ChatRequest, key: str) -> str:
        torch = self._torch
        input_ids = self._encode(request)
        # Per-request seed: the reply does not depend on which requests ran before it.
        torch.manual_seed((self.seed * 1_000_003 + int(key[:12], 16)) % 2**63)
        sample = request.temperature > 0
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        with torch.no_grad():
            output = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=request.max_tokens, do_sample=sample,
                temperature=request.temperature if sample else None, top_p=None, top_k=None,
                pad_token_id=pad_id)
        return self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)

    def complete(self, request: ChatRequest) -> str:
        self.stats.add("calls")
        # The folder path stands in for the model name: a different checkpoint, a different key.
        body = request.body(str(Path(self.path).resolve()))
        key = request_key(self.backend_name, body)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.add("cached")
            return cached
        self.stats.add("requests")
        try:
            content = self._generate(request, key)
        except (RuntimeError, ValueError) as e:
            # Generation errors (e.g. a prompt longer than the model's context) fail this one
            # request only; the caller counts it and carries on.
            self.stats.fail("generate_error")
            raise LLMError("generate_error", str(e)) from e
        self.cache.put(key, body, content)
        self.stats.add("succeeded")
        return content

    def close(self) -> None:
        # Drop the model so its memory can go before the next stage step.
        self.model = None

    def complete_many(self, requests: Sequence[ChatRequest], desc: str = "") -> list[str | None]:
        results: list[str | None] = []
        for request in tqdm(requests, desc=desc or "local llm", disable=None):
            try:
                results.append(self.complete(request))
            except LLMError as e:
                log.warning("local generation failed: %s", e)
                results.append(None)
        return results
