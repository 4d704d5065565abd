"""The vLLM KV connector of kvtier.

    --kv-transfer-config '{"kv_connector": "KVTierConnector", "kv_connector_module_path": "connectors.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}'
"""

from connectors.vllm.connector import KVTierConnector

__all__ = ["KVTierConnector"]
