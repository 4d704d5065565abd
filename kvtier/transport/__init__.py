"""Cross-node reuse: pulling KV blocks from a peer daemon (NIXL or a ZeroMQ block stream) and finding
them through the shared index (docs/peer.md)."""
