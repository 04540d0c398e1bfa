"""Joint encoding's plans (:mod:`~.joint`): how each encode target is coded, plans cut at L3 chunk boundaries, and
the encoder's side that codes planned targets (on its thread and stream) into residual and new reference blobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..codec.blob import BlobHeader
from ..codec.joint import JointCodec, reference_tag
from .kv_io import PoolKV
from .tree_walk import TreeNode


@dataclass(frozen=True)
class JointPlan:
    """How one encode target is coded: against ``[lo, hi)`` of reference ``ref``, or (``ref`` None) against
    ``[lo, hi)`` of a new reference made of the tokens of every target of its ``group`` (consecutive pieces of one
    match, cut at L3 chunk boundaries; 0: this target alone), whose token ids the first piece's ``tokens`` holds.
    ``fetch``/``header``/``ready``: the reference blob's bytes, header and put event (for the encoder, which decodes
    the span on its own stream)."""

    ref: int | None
    lo: int
    hi: int
    fetch: Callable[[], Any] | None = None
    header: BlobHeader | None = None
    ready: Any = None
    group: int = 0
    tokens: tuple[int, ...] = ()


def chunked(planned: list[tuple[TreeNode, int, JointPlan | None]], chunk: int, cut: Callable[[TreeNode, int], TreeNode],
            book: Any) -> list[tuple[TreeNode, int, JointPlan | None]]:
    """``planned`` targets cut at multiples of ``chunk`` positions (the L3 tier's objects hold whole blobs of
    one chunk): the pieces of a residual are residuals against consecutive spans of the same reference (each
    pins it), the pieces of a new reference's target make that reference together (one ``group``)."""
    out: list[tuple[TreeNode, int, JointPlan | None]] = []
    for node, lo, plan in planned:
        end, at, pieces = lo + len(node.key), lo, []
        for b in range((lo // chunk + 1) * chunk, end, chunk):
            pieces.append((cut(node, b - at), at))
            at = b
        pieces.append((node, at))
        group = 0
        if plan is not None and plan.ref is None and len(pieces) > 1:
            group = book.new_group()
        for j, (piece, p_lo) in enumerate(pieces):
            if plan is None:
                out.append((piece, p_lo, None))
                continue
            if plan.ref is not None and j:
                book.pin(plan.ref)  # every piece's encode reads the reference; each commit unpins once
            off = plan.lo + p_lo - lo
            out.append((piece, p_lo, replace(plan, lo=off, hi=off + len(piece.key), group=group,
                                             tokens=plan.tokens if j == 0 else ())))  # fmt: skip
    return out


def encode_planned(jc: JointCodec, kv: PoolKV, segments: list[tuple[torch.Tensor, torch.Tensor]],
                   plans: list[JointPlan | None], results: list[Any]) -> dict[int, tuple[torch.Tensor, BlobHeader]]:
    """The encoder's side (on its thread and stream): residual blobs of the planned targets ``segments[i] =
    (slots [T_i], positions [T_i])`` into ``results[i] = (blob, header)``, against a stored reference's span (each
    reference decoded once) or against a new reference made of the rows of the target's group (its own alone when it
    has none); returns the new references ``{first target of the group: (blob, header)}``."""
    decoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    made: dict[int, tuple[torch.Tensor, BlobHeader]] = {}
    planned = [(i, p) for i, p in enumerate(plans) if p is not None]
    idx = [i for i, _ in planned]
    coeffs = {i: jc.coefficients_rows(kv.k_buffers, kv.v_buffers, *segments[i]) for i in idx}  # ([T, R_k], [T, R_v])
    groups: dict[int, list[int]] = {}  # a new reference -> its pieces, in order (keyed by its first piece)
    for i, plan in planned:
        if plan.ref is None:
            groups.setdefault(plan.group or -1 - i, []).append(i)
    new: dict[int, tuple[tuple[torch.Tensor, torch.Tensor], BlobHeader]] = {}  # piece -> (reference coeffs, header)
    for pieces in groups.values():
        c = (torch.cat([coeffs[i][0] for i in pieces]), torch.cat([coeffs[i][1] for i in pieces]))  # [T_g, R_k/v]
        blob, ref_c = jc.encode_reference(c, torch.cat([segments[i][1] for i in pieces]), kv.dtype)
        made[pieces[0]] = (blob, jc.reference.read_header(blob))
        new.update({i: (ref_c, made[pieces[0]][1]) for i in pieces})
    refs, tags = [], []
    for i, plan in planned:
        if plan.ref is None:
            (rk, rv), header = new[i]
            ref_c = (rk[plan.lo : plan.hi], rv[plan.lo : plan.hi])
            tags.append(reference_tag(header, plan.lo, plan.hi))
        else:
            if plan.fetch is None or plan.header is None:
                raise ValueError(f"a plan against reference {plan.ref} needs its blob and header")
            if plan.ref not in decoded:
                (payload,) = jc.read_references([plan.fetch()], kv.device)
                decoded[plan.ref] = jc.reference_coefficients(payload, plan.header.num_tokens)
            rk, rv = decoded[plan.ref]
            ref_c = (rk[plan.lo : plan.hi], rv[plan.lo : plan.hi])
            tags.append(reference_tag(plan.header, plan.lo, plan.hi))
        refs.append(ref_c)
    blobs = jc.encode_residuals([coeffs[i] for i in idx], refs, tags, [segments[i][1] for i in idx], kv.dtype)
    for i, blob in zip(idx, blobs, strict=True):
        results[i] = (blob, jc.read_header(blob))
    return made
