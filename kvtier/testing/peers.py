"""Settings of a daemon that shares an index with its peers, for tests and benchmarks of peer
fetch (``tests/transport``, ``tests/vllm/test_peer_vllm.py``, ``benchmarks/peer.py``)."""

from __future__ import annotations

PEER_TOKEN = "peer-test-token-0123456789"


def peer_env(node: str, index: str, namespace: str, *, port: int | None = None, transport: str = "auto",
             token: str = PEER_TOKEN, **extra: str) -> dict[str, str]:
    """``KVTIER_*`` variables for daemon ``node`` publishing to ``index`` (a Redis URL) under
    ``namespace``, listening for peers on ``127.0.0.1:port`` with ``token`` (none when empty),
    pulling over ``transport``; ``extra`` adds or overrides variables. Publishes and beats fast,
    so a test sees another node's blocks within a fraction of a second."""
    env = {
        "KVTIER_DAEMON_NODE": node,
        "KVTIER_PUBLISH_INDEX": index,
        "KVTIER_PUBLISH_NAMESPACE": namespace,
        "KVTIER_PUBLISH_INTERVAL_S": "0.05",
        "KVTIER_PUBLISH_HEARTBEAT_S": "0.5",
        "KVTIER_PEER_TRANSPORT": transport,
    }
    if token:
        env["KVTIER_DAEMON_AUTH_TOKEN"] = token
    if port is not None:
        env["KVTIER_DAEMON_TCP_ADDRESS"] = f"127.0.0.1:{port}"
    return {**env, **extra}
