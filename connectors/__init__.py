"""Integrations of kvtier into serving engines (``connectors.vllm``: the vLLM KV connector)."""
