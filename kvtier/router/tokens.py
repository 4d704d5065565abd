"""The token ids vLLM will see for a request, computed by the router to ask the index about them.

The served model's own tokenizer (``transformers``), used the way vLLM's OpenAI server uses it:

- ``/v1/completions``: a string prompt is encoded with special tokens (the request's
  ``add_special_tokens``, default true); a list of token ids is taken as is. A batch of
  prompts has no single prefix: it gets no tokens (the policy routes it by load).
- ``/v1/chat/completions``: the chat template renders the messages to text
  (``add_generation_prompt`` default true, ``continue_final_message``, ``chat_template_kwargs``,
  the request's ``tools``), then that text is encoded without special tokens (the request's
  ``add_special_tokens``, default false): the template writes them. Text parts of a message's
  content are joined with newlines, as vLLM does for text-only content; other parts (images,
  audio) change the ids vLLM computes, so such requests get no tokens.

``tests/router/test_router_vllm.py`` compares these ids with vLLM's own ``/tokenize``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


class UnroutableBody(ValueError):
    """The body cannot be tokenized here; the request is routed by load, never refused for it."""


class PromptTokenizer:
    """One model's tokenizer. ``tokenize`` is CPU work: call it off the event loop."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        self.name = name_or_path
        self._tokenizer = AutoTokenizer.from_pretrained(name_or_path)

    def completion(self, body: Mapping[str, Any]) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return list(self._tokenizer.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens", True))))
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return prompt
        raise UnroutableBody("the prompt is not one string or one list of token ids")

    def chat(self, body: Mapping[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise UnroutableBody("no messages")
        conversation = [_text_message(message) for message in messages]
        kwargs = dict(body.get("chat_template_kwargs") or {})
        if body.get("tools"):
            kwargs["tools"] = body["tools"]
        continue_final = bool(body.get("continue_final_message", False))
        text = self._tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=bool(body.get("add_generation_prompt", True)) and not continue_final,
            continue_final_message=continue_final, chat_template=body.get("chat_template"), **kwargs)
        return list(self._tokenizer.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False))))


def _text_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise UnroutableBody("a message is not an object with a role")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise UnroutableBody("a message has non-text content")
            texts.append(part["text"])
        message = {**message, "content": "\n".join(texts)}
    elif content is not None and not isinstance(content, str):
        raise UnroutableBody("a message's content is neither text nor a list of parts")
    return message


@functools.lru_cache(maxsize=8)
def tokenizer_for(name_or_path: str) -> PromptTokenizer:
    """Loaded once per model (a few seconds for a large vocabulary)."""
    log.info("loading the tokenizer of %s", name_or_path)
    return PromptTokenizer(name_or_path)
