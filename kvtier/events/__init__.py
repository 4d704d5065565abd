"""What daemons and engines tell the index: block events per node, source and tier.

``model`` holds the domain types, ``wire`` kvtier's own msgpack encoding of them (used by every
publisher and every index backend), ``vllm`` the decoding of vLLM's KV events.
"""
