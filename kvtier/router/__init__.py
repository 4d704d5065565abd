"""``kvtier route``: send each OpenAI request to the vLLM replica that caches its prefix."""
