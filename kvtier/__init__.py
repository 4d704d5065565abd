"""kvtier: tiered KV-cache offloading for vLLM fleets.

Layout of the package (one folder per concept):

- ``kvtier.blocks``  block identity: layouts, chained block hashes, checksums, block keys
- ``kvtier.tiers``   storage backends behind one interface (host arena, disk, S3)
- ``kvtier.policy``  eviction policies (LRU, S3-FIFO)
- ``kvtier.chain``   the tier chain: placement, demotion, promotion, pins and leases, stats
- ``kvtier.copy``    page copies between vLLM's paged KV cache and the host arena
- ``kvtier.cli``     the ``kvtier`` command
"""

__version__ = "0.1.0"
