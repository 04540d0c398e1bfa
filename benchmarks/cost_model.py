"""Where KVTC pays off: per-token restore work against per-token prefill work, for published model geometries.

Restoring a token decodes its K and V: dequantize ``R`` coefficients per stream, project them back to
``F = L*H*D`` features (``F*R`` multiply-adds, ``2*F*R`` FLOPs per stream), add the mean, undo the scale,
re-apply RoPE, plus inflating ``4*F/ratio`` bytes of DEFLATE. Recomputing it (prefill) costs about two
FLOPs per weight of the layers' projections and MLPs, plus attention over its context
(``4 * L * n_heads * head_dim`` FLOPs per context token for ``QK^T`` and ``AV``).

Three constants come from this machine, measured in one run on a real model (SmolLM2, or Qwen2.5-Coder-0.5B
with ``--model qwen2.5-coder-0.5b``) and its calibration: ``matmul``, the FLOP rate of an fp32
(``--dot-precision bf16``: bf16, as the CPU server runs it where the CPU has native bf16 GEMMs)
``[T, R] @ [R, F]`` projection (the restore's main term); ``overhead``, the rest of a real ``codec.decode``
per feature (dequantization, RoPE, DEFLATE, mean and scale); ``prefill``, that model's own prefill FLOP rate
(dense fp32 weights, as the CPU server runs it).
Other models' ranks are not measured (no weights here): ``R = rho * F`` with ``rho`` from this
calibration, and a second row with ``rho`` from the paper's 70B figure (the stored basis is about 2.4% of
the parameters, so ``2*F*R = 0.024 * params``).

    python benchmarks/cost_model.py --artifact artifacts/smollm2-135m-instruct.r16.kvtc.safetensors
    python benchmarks/cost_model.py --model qwen2.5-coder-0.5b \
        --artifact artifacts/qwen2.5-coder-0.5b.r16.kvtc.safetensors

Caveat printed with the table: a 576-wide model runs its prefill far below the CPU's matmul peak, so the
measured SmolLM2 prefill rate understates how fast a large model prefills per FLOP; the FLOP ratio column
does not depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Geometry:
    """A published decoder config (values from the model's ``config.json``)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    params: float  # total parameters, embeddings included

    @property
    def features(self) -> int:
        """``F = L * H * D`` per stream."""
        return self.layers * self.kv_heads * self.head_dim

    def prefill_flops(self, context: int) -> float:
        """FLOPs to prefill one token that attends to ``context`` earlier tokens (no LM head)."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        attn = 4 * self.heads * self.head_dim * context
        return self.layers * (2 * (q_o + k_v + mlp) + attn)


MODELS = (
    Geometry("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 134.5e6),
    Geometry("Qwen2.5-0.5B", 24, 896, 14, 2, 64, 4864, 494e6),
    Geometry("Qwen2.5-7B", 28, 3584, 28, 4, 128, 18944, 7.62e9),
    Geometry("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 8.03e9),
    Geometry("Llama-3.1-70B", 80, 8192, 64, 8, 128, 28672, 70.6e9),
)
PAPER_BASIS_SHARE = 0.024  # KVTC paper: stored basis ~2.4% of a 70B model's parameters


def _median_seconds(fn, repeat: int) -> float:
    fn()  # warm-up: oneDNN primitives and the allocator's first buffers are made on the first call
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class Constants:
    matmul_flops: float  # FLOP/s of the restore projection
    overhead_s_per_feature: float  # the rest of a decode, per token per feature (both streams)
    prefill_flops: float  # FLOP/s of the measured model's prefill
    rho: float  # coded rank / F of the calibration
    measured_restore_s: float  # per token
    measured_prefill_s: float  # per token


GEOMETRY_OF = {"smollm2-135m-instruct": "SmolLM2-135M", "qwen2.5-coder-0.5b": "Qwen2.5-0.5B"}


def measure(model_name: str, artifact_path: Path, tokens: int, repeat: int, precision: str = "ieee") -> Constants:
    """Measure the constants on the real model ``model_name``, real held-out text and the given calibration."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvtc_sglang.calibration.corpus import token_sequences
    from kvtc_sglang.calibration.model import prefill_kv
    from kvtc_sglang.codec import KVTCCodec, load_artifact
    from kvtc_sglang.codec.spec import spec_from_config
    from kvtc_sglang.serve.export import export_model

    # The dense export, in fp32 as the CPU server runs it (bf16 matmuls are several times slower on this CPU;
    # the GGUF-loaded model keeps packed weights and prefills slower still). The KV cache stays bf16.
    hf_dir = export_model(model_name)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    spec = spec_from_config(model.config, model_name, "bfloat16", serving=False)
    art = load_artifact(artifact_path, expect=spec)
    codec = KVTCCodec(art, dot_precision=precision)
    (ids,), _ = token_sequences(tokenizer, "evaluation", "prose", tokens, tokens)
    with torch.inference_mode():
        k, v, _ = prefill_kv(model, ids)  # [L, T, H, D] fp32
        k, v = k.bfloat16(), v.bfloat16()  # the KV pool's dtype
        t_prefill = _median_seconds(lambda: prefill_kv(model, ids), repeat)
        pos = torch.arange(tokens)
        blob = codec.encode(k, v, pos)
        t_decode = _median_seconds(lambda: codec.decode(blob), repeat)
        f = spec.num_features
        ranks = [art.keys.allocation.rank, art.values.allocation.rank]
        gen = torch.Generator().manual_seed(0)  # timing only: the projection's cost does not depend on the values
        coeffs = [torch.randn(tokens, r, generator=gen) for r in ranks]  # [T, R] per stream
        low = torch.bfloat16 if precision == "bf16" else torch.float32  # the projection as the codec runs it
        coeffs = [c.to(low) for c in coeffs]
        bases = [s.basis.T.contiguous().to(low) for s in (art.keys, art.values)]  # [R, F] per stream
        t_proj = _median_seconds(lambda: [c @ b for c, b in zip(coeffs, bases, strict=True)], repeat)
    proj_flops = sum(2 * tokens * f * r for r in ranks)
    geometry = next(g for g in MODELS if g.name == GEOMETRY_OF[model_name])
    prefill_flops = sum(geometry.prefill_flops(c) for c in range(tokens))
    return Constants(
        matmul_flops=proj_flops / t_proj,
        overhead_s_per_feature=max(t_decode - t_proj, 0.0) / (tokens * 2 * f),
        prefill_flops=prefill_flops / t_prefill,
        rho=sum(ranks) / (2 * f),
        measured_restore_s=t_decode / tokens,
        measured_prefill_s=t_prefill / tokens,
    )


def rows(c: Constants, context: int) -> list[tuple[str, str, float, float, float, float]]:
    """(model, rho source, F, restore FLOPs, FLOP ratio, estimated time ratio) per model and rank guess."""
    out = []
    for g in MODELS:
        f = g.features
        paper_rho = PAPER_BASIS_SHARE * g.params / (2 * f) / f
        for label, rho in (("this calibration", c.rho), ("paper 2.4%", paper_rho)):
            r = min(rho, 1.0) * f
            restore_flops = 2 * 2 * f * r
            prefill = g.prefill_flops(context)
            t_restore = restore_flops / c.matmul_flops + c.overhead_s_per_feature * 2 * f
            t_prefill = prefill / c.prefill_flops
            out.append((g.name, label, f, restore_flops, prefill / restore_flops, t_prefill / t_restore))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(GEOMETRY_OF), default="smollm2-135m-instruct",
                   help="the model whose prefill and codec are timed")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=1024, help="held-out tokens timed (also the context)")
    p.add_argument("--context", type=int, default=4096, help="prefix length the table assumes")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dot-precision", choices=("ieee", "bf16"), default="ieee",
                   help="the codec's projections (bf16: what the CPU server picks on a CPU with native bf16 GEMMs)")
    args = p.parse_args()
    c = measure(args.model, args.artifact, args.tokens, args.repeat, args.dot_precision)
    measured = GEOMETRY_OF[args.model]
    print(
        f"measured here ({torch.get_num_threads()} threads, {args.dot_precision} projections): restore projection "
        f"{c.matmul_flops / 1e9:.1f} GFLOP/s, "
        f"other decode work {1e9 * c.overhead_s_per_feature:.2f} ns/feature, {measured} prefill "
        f"{c.prefill_flops / 1e9:.1f} GFLOP/s; {measured} per token: restore {1e3 * c.measured_restore_s:.3f} ms, "
        f"prefill {1e3 * c.measured_prefill_s:.3f} ms ({c.measured_prefill_s / c.measured_restore_s:.1f}x); "
        f"coded rank rho = R/F = {c.rho:.3f}\n"
    )
    print(f"| model | rank from | F per stream | restore GFLOP/token | prefill/restore FLOPs (ctx {args.context}) "
          "| est. prefill/restore time |")
    print("|---|---|---|---|---|---|")
    for name, label, f, restore, flop_ratio, time_ratio in rows(c, args.context):
        print(f"| {name} | {label} | {f} | {restore / 1e9:.2f} | {flop_ratio:.1f}x | {time_ratio:.1f}x |")
    print(f"\nTime ratios use {measured}'s measured prefill rate for every model; larger models prefill closer to the "
          "matmul peak, so for them the time ratio is an upper bound on what a CPU restore saves.")


if __name__ == "__main__":
    main()
