"""Counters of the KVTC radix cache, reported through SGLang's logger and ``available_and_evictable_str``."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class KVTCStats:
    """Running totals (``resident_*`` are current values, the rest only grow)."""

    resident_nodes: int = 0
    resident_tokens: int = 0
    resident_raw_bytes: int = 0
    resident_blob_bytes: int = 0
    resident_store_bytes: int = 0  # store blocks the resident blobs hold (equal on every tensor-parallel rank)
    compressions: int = 0  # nodes whose slots were freed, their blob kept (device -> compressed)
    compressed_tokens: int = 0
    encodes: int = 0  # blobs made (by the background worker or inline)
    encoded_tokens: int = 0
    compress_seconds: float = 0.0  # encode time, wherever it ran
    worker_seconds: float = 0.0  # encode time on the background worker (off the scheduler thread)
    scheduler_codec_seconds: float = 0.0  # codec time on the scheduler thread (restores, inline encodes)
    discarded_encodes: int = 0  # background encodes whose node changed before the commit
    discarded_encoded_tokens: int = 0  # kept blobs dropped before any restore (encode work lost, no KV)
    inline_encodes: int = 0  # evicts that encoded on the scheduler thread (the encoder had fallen behind)
    inline_encoded_tokens: int = 0
    encoder_waits: int = 0  # times the scheduler waited for the background encoder (a rare fallback)
    restores: int = 0
    restored_tokens: int = 0
    restore_seconds: float = 0.0
    adopted_tokens: int = 0
    restore_no_memory: int = 0
    retained_tokens: int = 0  # device tokens whose blob is kept (going cold again costs no encode)
    reused_blobs: int = 0  # compressions served by a kept blob
    reused_tokens: int = 0  # tokens of those (not encoded again)
    load_backs: int = 0  # init_load_back calls that loaded all promised tokens
    load_back_failures: int = 0  # init_load_back calls that loaded nothing (the request recomputes)
    restore_failures: int = 0  # restores that raised something other than a damaged blob (slots freed)
    checksum_failures: int = 0
    verified_restores: int = 0  # restored nodes checked against their reference (``verify_restores``)
    verify_failures: int = 0  # restored rows that differ from what their blob decoded to when it was made
    dropped_nodes: int = 0
    dropped_tokens: int = 0
    dropped_unused_tokens: int = 0  # compressed tokens dropped before any restore (compressed for nothing)
    store_full: int = 0
    store_full_tokens: int = 0  # encoded tokens whose blob the store could not take (the encode was wasted)
    encodes_deferred: int = 0  # locked nodes passed over, counted per plan: the store could not take their blobs
    dropped_kept_tokens: int = 0  # tokens of kept blobs dropped (a later compression of the node encodes again)
    starving_passes: int = 0  # passes in which a request matched had waited STARVE_TICKS: wanted slots are room
    encode_pauses: int = 0  # times encoding paused because blobs were being dropped unused (governor.py)
    # the host tier (placement.py): blobs that left the store for host memory instead of being dropped
    host_resident_nodes: int = 0
    host_resident_tokens: int = 0
    host_resident_raw_bytes: int = 0
    host_resident_bytes: int = 0  # host budget in use (blobs' store-block sizes)
    host_demotions: int = 0
    host_demoted_bytes: int = 0
    host_demoted_tokens: int = 0
    host_full: int = 0  # blobs that could not move to host memory (no room) and were dropped
    host_adopted: int = 0  # new blobs the store could not take, kept in host memory from the start
    host_restores: int = 0  # nodes restored from host memory
    host_restored_tokens: int = 0
    host_dropped_tokens: int = 0  # compressed tokens dropped from host memory
    host_seconds: float = 0.0  # scheduler-thread seconds of demotions (on a GPU: issuing the copies)
    # joint encoding across requests (joint.py): references shared by residual blobs of the same text
    joint_references: int = 0  # references stored now
    joint_reference_tokens: int = 0
    joint_reference_bytes: int = 0
    joint_residual_blobs: int = 0  # blobs coded as residuals now (retained or compressed)
    joint_residual_tokens: int = 0
    joint_residual_bytes: int = 0
    joint_matches: int = 0  # spans of encode targets that matched a reference or seen text
    joint_references_made: int = 0
    joint_references_fetched: int = 0  # adopted from the L3 tier for grafted residuals
    joint_references_dropped: int = 0  # freed with their last dependant
    joint_restored_tokens: int = 0  # tokens restored from residual blobs
    joint_discards: int = 0  # residual encodes thrown away: the reference went, or the store could not take it
    # the L3 tier (l3_tier.py; l3_put_*/l3_get_* mirror its client's counters)
    l3_offered: int = 0  # objects built at commits (queued or dropped)
    l3_references_written: int = 0  # joint encoding's reference objects queued for the L3
    l3_parked: int = 0  # requests held back while their chunks were looked up
    l3_hits: int = 0  # chunks grafted into the tree from L3
    l3_hit_tokens: int = 0
    l3_rejected: int = 0  # objects that failed a check (frame, MAC, calibration, positions): a miss
    l3_prefetch_timeouts: int = 0
    l3_put_objects: int = 0
    l3_put_bytes: int = 0
    l3_put_dropped: int = 0  # writes dropped: the queue was full (back-pressure)
    l3_put_failed: int = 0
    l3_put_seconds: float = 0.0
    l3_get_objects: int = 0
    l3_get_bytes: int = 0
    l3_get_errors: int = 0
    l3_get_seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """Achieved compression of what is resident now (raw KV bytes / blob bytes, the shared references' bytes
        included in full: they are stored for retained nodes' residuals too)."""
        held = self.resident_blob_bytes + self.joint_reference_bytes
        return self.resident_raw_bytes / held if self.resident_blob_bytes else 0.0

    @property
    def store_ratio(self) -> float:
        """Raw KV bytes / store bytes of what is resident now: :attr:`ratio` with the blobs' block rounding (and
        the ranks' largest blob under tensor parallelism), the same on every rank; what tree decisions use."""
        pool_raw = self.resident_raw_bytes - self.host_resident_raw_bytes  # blobs in host memory hold no store bytes
        return pool_raw / self.resident_store_bytes if self.resident_store_bytes else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": round(self.ratio, 3)}

    def summary(self) -> str:
        return (
            f"kvtc: {self.resident_tokens} tokens in {self.resident_nodes} compressed nodes "
            f"({self.resident_blob_bytes / 2**20:.1f} MiB, {self.ratio:.1f}x), "
            f"compressions={self.compressions} reused_blobs={self.reused_blobs} restores={self.restores} "
            f"restore_ms={1e3 * self.restore_seconds:.1f} checksum_failures={self.checksum_failures} "
            f"dropped_tokens={self.dropped_tokens}"
            + (
                f" host_tokens={self.host_resident_tokens} host_mib={self.host_resident_bytes / 2**20:.1f} "
                f"host_restored_tokens={self.host_restored_tokens}"
                if self.host_demotions else ""
            )
        )
