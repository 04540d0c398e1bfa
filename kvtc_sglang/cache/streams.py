"""The stream rules of every pool-row access kvtc makes outside SGLang's forward, in one object (as HiCache's
``load_fence_stream``/``write_fence_stream`` and its producer events): which stream waits on which event.

Three producers matter on a GPU under SGLang's overlap scheduler:

- the **forward stream** may still write slots the scheduler has already freed (the batch in flight);
- the **schedule stream** (the scheduler thread's current stream) makes, in the same tick, the tensors kvtc
  reads: the allocator's free list and the slots ``alloc`` returns, the ``node.value`` copies of a split;
- kvtc's own streams (encode, inline encode, store, load, host) read or write pool rows the next batch reads
  or reuses.

The rules (:meth:`StreamFences.enter`, :meth:`StreamFences.before_forward`):

1. a kvtc stream that reads or writes pool rows first waits on an event recorded on the forward stream
   (``fence``) and on the schedule stream (``produced``) when the work is issued;
2. work that reads only blobs (a restore's store reads, CRC checks, inflate) waits only on the events of the
   puts that wrote them (``BlobHandle.ready``): its host syncs never wait on the forward in flight;
3. the forward stream waits on kvtc's event before any later batch once that work's rows may be read or
   reused (``before_forward``), whether the work succeeded or not; rows kvtc frees while a copy still
   reads them (a blob leaving the store for host memory) are also waited on by kvtc's writing streams
   (``freed``).

The scheduler thread never waits on a stream: only events are recorded and waited on by streams. On the CPU
there are no streams and every rule holds by construction (``ops`` is ``None``; every method is a no-op).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


class CudaStreamOps:
    """The stream API the fences use (torch's CUDA streams); tests pass a recording stand-in."""

    def stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def event(self) -> Any:
        return torch.cuda.Event()

    def current(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def use(self, stream: Any) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def synchronize(self, device: torch.device) -> None:
        """The whole device (debugging only: ``verify_restores``)."""
        torch.cuda.synchronize(device)


def keep_for(stream: Any, *tensors: torch.Tensor) -> None:
    """Tell torch's caching allocator that ``stream`` uses these tensors (made on another stream)."""
    if stream is None:
        return
    for t in tensors:
        if t.is_cuda:
            t.record_stream(stream)


class StreamFences:
    """kvtc's streams of one pool and the events that order them against SGLang's streams.

    Args:
        device: the pool's device.
        ops: the stream API; ``None`` on the CPU (no streams, no events).
    """

    # background encodes, inline encodes, blob puts, a restore's blob reads (CRC, inflate), a restore's row
    # writes, copies of blobs between the store and host memory
    NAMES = ("encode", "inline", "store", "read", "load", "host")

    def __init__(self, device: torch.device, ops: CudaStreamOps | None) -> None:
        self.device = device
        self.ops = ops
        self._forward: Any = None  # SGLang's forward stream (bound by the plugin at the first tick)
        self.streams: dict[str, Any] = {name: ops.stream(device) if ops else None for name in self.NAMES}

    def bind_forward_stream(self, stream: Any) -> None:
        """SGLang's forward stream (``Scheduler.forward_stream`` under the overlap scheduler); ``None``: the
        forward runs on the scheduler's current stream (the normal loop), taken now, on the scheduler thread."""
        if self.ops is not None:
            self._forward = stream if stream is not None else self.ops.current(self.device)

    def forward_stream(self) -> Any:
        """The forward stream (unbound: the calling thread's current stream; only the scheduler thread asks)."""
        if self.ops is None:
            return None
        return self._forward if self._forward is not None else self.ops.current(self.device)

    def record(self, stream: Any) -> Any:
        """An event recorded on ``stream`` now (``None`` on the CPU)."""
        if self.ops is None or stream is None:
            return None
        event = self.ops.event()
        event.record(stream)
        return event

    def issued(self) -> tuple[Any, ...]:
        """Events for work issued now by the scheduler thread: the forward stream after everything issued on it
        (rule 1's ``fence``) and, when it is another stream, the schedule stream after what it produced this
        tick (``produced``); the last one is always the producer's (the fence in the normal loop, where the
        scheduler's stream is the forward stream). Empty on the CPU."""
        if self.ops is None:
            return ()
        forward, current = self.forward_stream(), self.ops.current(self.device)
        fence = self.record(forward)
        return (fence,) if current is forward else (fence, self.record(current))

    def enter(self, name: str, events: tuple[Any, ...] | list[Any]) -> AbstractContextManager:
        """Run the block on kvtc's stream ``name`` after ``events`` (``None`` entries skipped); a no-op context
        on the CPU."""
        stream = self.streams[name]
        if self.ops is None or stream is None:
            return nullcontext()
        for event in events:
            if event is not None:
                stream.wait_event(event)
        return self.ops.use(stream)

    def done(self, name: str) -> Any:
        """An event on kvtc's stream ``name`` after everything issued on it (``None`` on the CPU)."""
        return self.record(self.streams[name])

    def before_forward(self, event: Any) -> None:
        """Make every later batch of the forward stream wait on ``event`` (rule 3; no host sync)."""
        if event is not None:
            self.forward_stream().wait_event(event)

    def freed(self, event: Any) -> None:
        """Pool rows read by work that ends at ``event`` are free from now on (a blob copied out of the store):
        the kvtc streams that write rows (puts, restores) and every later batch wait on it (no host sync)."""
        if event is None:
            return
        for name in ("store", "load"):
            self.streams[name].wait_event(event)
        self.before_forward(event)

    def keep(self, name: str, *tensors: torch.Tensor) -> None:
        """``tensors`` (made on another stream) are used on kvtc's stream ``name``."""
        keep_for(self.streams[name], *tensors)

    def synchronize(self) -> None:
        """Wait for the whole device (debugging only: ``verify_restores``); nothing on the CPU."""
        if self.ops is not None:
            self.ops.synchronize(self.device)
