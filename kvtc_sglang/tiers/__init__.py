"""Off-GPU tiers of kvtc: the shared (L3) store of compressed KV objects, standalone (no SGLang imports).

``keys`` names token chunks (content-addressed hash chains), ``frame`` is the object format on the wire,
``l3`` the storage backends (a directory, the Mooncake store), ``l3_client`` the asynchronous side (write
queue, prefetch with deadlines, counters)."""
