"""Tallies and tables of ``joint_encoding.py``: cosines of two sessions' copies of a file, methods' scores, the go
criterion (reference + residual >= 1.5x fewer bytes than KVTC alone at a KL no higher)."""

from __future__ import annotations

from collections import defaultdict

import torch

from kvtc_sglang.codec import KVTCCodec
from kvtc_sglang.codec.rope import remove_rope
from kvtc_sglang.eval.joint import FusionRule, best_block_cosines, row_span_cosines, share_at_least, span_cosines
from kvtc_sglang.eval.joint_sessions import Score, Session

THRESHOLDS = (0.75, 0.9, 0.99)
SPANS = (16, 64)
GO_FACTOR = 1.5


class Tallies:
    """Everything one run measures, keyed by offset kind (``same``, ``different``, ``control``; ``all`` pools the
    first two)."""

    def __init__(self, raw_bytes_per_token: int) -> None:
        self.raw = raw_bytes_per_token
        self.scores: dict[tuple[str, str], Score] = defaultdict(Score)
        self.values: dict[str, list[float]] = defaultdict(list)
        self.cos: dict[tuple[str, str, int], list[torch.Tensor]] = defaultdict(list)
        self.best: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.same_text: dict[str, list[torch.Tensor]] = defaultdict(list)

    def score(self, method: str, offset: str) -> list[Score]:
        """The tallies a continuation of ``method`` adds to: its offset kind's, and the pooled one (not the control)."""
        return [self.scores[(method, offset)]] + ([self.scores[(method, "all")]] if offset != "control" else [])

    def value(self, name: str, x: float) -> None:
        self.values[name].append(x)

    def similarity(self, reader: Session, ref: Session, codec: KVTCCodec, offset: str, rule: FusionRule) -> None:
        """Cosines of the two copies of the file (the control: the same positions of another file)."""
        n = reader.file_tokens
        a, b = slice(reader.prefix, reader.prefix + n), slice(ref.prefix, ref.prefix + n)
        pa, pb = torch.arange(reader.prefix, reader.prefix + n), torch.arange(ref.prefix, ref.prefix + n)
        ropes = codec.spec.ropes
        pairs = {
            "keys, RoPE (as stored)": (reader.k[:, a], ref.k[:, b]),
            "keys, RoPE removed": (remove_rope(reader.k[:, a], pa, ropes), remove_rope(ref.k[:, b], pb, ropes)),
            "values": (reader.v[:, a], ref.v[:, b]),
        }
        coeffs = [torch.cat(codec.transform(s.k[:, sl], s.v[:, sl], pos), dim=1)
                  for s, sl, pos in ((reader, a, pa), (ref, b, pb))]  # [n, R_k + R_v] each
        for span in SPANS:
            for name, (x, y) in pairs.items():
                self.cos[(name, offset, span)].append(span_cosines(x, y, span))  # [S, L]
            self.cos[("KVTC coefficients", offset, span)].append(row_span_cosines(*coeffs, span)[:, None])  # [S, 1]
        start = -(-reader.prefix // rule.block) * rule.block
        starts = list(range(start, reader.context - rule.block + 1, rule.block))
        best, where = best_block_cosines(reader.k, ref.k, starts, rule)  # [B, G]
        self.best[offset].append(best)
        same = torch.tensor(starts)[:, None] - reader.prefix + ref.prefix == where
        self.same_text[offset].append(same if offset != "control" else torch.zeros_like(same))

    def report(self) -> dict:
        sim: dict = defaultdict(dict)
        for (name, offset, span), parts in self.cos.items():
            c = torch.cat(parts)  # [S, L]
            sim[offset][f"{name} @ {span}"] = {
                "mean": float(c.mean()),
                "worst_layer_mean": float(c.mean(0).min()),
                "first_64_tokens_mean": float(torch.cat([p[: 64 // span] for p in parts]).mean()),
                "share_at_least": share_at_least(c, THRESHOLDS),
            }
        for offset, parts in self.best.items():
            best = torch.cat(parts)
            sim[offset]["best page-aligned block, 4-layer groups (paper) @ 16"] = {
                "mean": float(best.mean()),
                "share_at_least": share_at_least(best, THRESHOLDS),
                "best_is_same_text": float(torch.cat(self.same_text[offset]).float().mean()),
            }
        methods: dict = defaultdict(dict)
        for (method, offset), s in self.scores.items():
            methods[offset][method] = s.report(self.raw)
        values = {k: sum(v) / len(v) for k, v in self.values.items()}
        return {"similarity": dict(sim), "methods": dict(methods), "values": values, "go": go(dict(methods))}


def go(methods: dict) -> dict:
    """Per offset kind and reference kind: the fewest bytes a residual needs at a KL no higher than KVTC's first
    ratio alone, as a factor over KVTC's bytes; ``go`` when that factor reaches :data:`GO_FACTOR`."""
    out = {}
    for offset, rows in methods.items():
        kvtc = next((r for name, r in rows.items() if name.startswith("kvtc r")), None)
        if kvtc is None:
            continue
        for ref in sorted({name.split(" ref + ")[0] for name in rows if " ref + " in name}):
            ok = [r for name, r in rows.items() if name.startswith(f"{ref} ref") and r["mean_kl"] <= kvtc["mean_kl"]]
            best = min(ok, key=lambda r: r["bytes_per_token"], default=None)
            factor = kvtc["bytes_per_token"] / best["bytes_per_token"] if best else None
            out[f"{offset}, {ref} reference"] = {
                "kvtc_kl": kvtc["mean_kl"], "kvtc_bytes_per_token": kvtc["bytes_per_token"],
                "residual_bytes_per_token": best["bytes_per_token"] if best else None,
                "residual_kl": best["mean_kl"] if best else None,
                "factor": factor, "go": bool(factor and factor >= GO_FACTOR),
            }
    return out


def markdown(report: dict) -> str:
    lines = [f"## {report['model']}", "", "| offset | domain @ span | mean cos | worst layer | first 64 tok | "
             + " | ".join(f">= {t:g}" for t in THRESHOLDS) + " | best = same text |", "|---" * 8 + "|"]
    for offset, rows in report["similarity"].items():
        for name, r in rows.items():
            shares = " | ".join(f"{100 * r['share_at_least'][f'{t:g}']:.0f}%" for t in THRESHOLDS)
            worst = f"{r['worst_layer_mean']:.4f}" if "worst_layer_mean" in r else "-"
            first = f"{r['first_64_tokens_mean']:.4f}" if "first_64_tokens_mean" in r else "-"
            same = f"{100 * r['best_is_same_text']:.0f}%" if "best_is_same_text" in r else "-"
            lines.append(f"| {offset} | {name} | {r['mean']:.4f} | {worst} | {first} | {shares} | {same} |")
    lines += ["", "| offset | method | mean KL | top-1 | NLL change | bytes/token | ratio |", "|---" * 7 + "|"]
    for offset, rows in report["methods"].items():
        for name, r in rows.items():
            size = f"{r['bytes_per_token']:.1f} | {r['ratio']:.1f}x" if "ratio" in r else " | "
            lines.append(f"| {offset} | {name} | {r['mean_kl']:.4f} | {100 * r['top1']:.1f}% | "
                         f"{r['nll_change_pct']:+.2f}% | {size} |")
    lines += ["", "| go criterion | KVTC KL | KVTC B/token | residual B/token | residual KL | factor | go |",
              "|---" * 7 + "|"]
    for name, g in report["go"].items():
        fmt = (lambda x: "-" if x is None else f"{x:.4g}")  # noqa: E731
        lines.append(f"| {name} | {fmt(g['kvtc_kl'])} | {fmt(g['kvtc_bytes_per_token'])} | "
                     f"{fmt(g['residual_bytes_per_token'])} | {fmt(g['residual_kl'])} | {fmt(g['factor'])} | "
                     f"{'yes' if g['go'] else 'no'} |")
    lines += ["", "| measure | mean |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in report["values"].items()]
    return "\n".join(lines)
