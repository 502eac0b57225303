"""Benchmark: full-sequence forward (logits for every position) of SmolLM2-135M on CPU, opd_jax vs
transformers on identical weights.

Both sides run float32 on the dequantized default teacher (``LlamaForCausalLM`` receives our
parameters through ``to_hf_state_dict``; ``torch.no_grad``). Reported per implementation: median wall
time per call after warm-up, tokens/s, achieved GFLOP/s and the fraction of the 315 GFLOP/s float32
matmul peak measured on the reference CPU (DESIGN.md). FLOPs per token are
``ModelConfig.flops_per_token(context=T)``: 2 x matmul parameters (unembedding included) plus
attention over the whole ``T`` (PaLM's MFU convention; the causal half is not subtracted, and XLA does
compute the masked half). The ratio column is against transformers. The largest logit difference
between the two is printed as a sanity check. Writes ``benchmarks/results/forward.json``.

    python benchmarks/forward.py                 # B=8, T=512 (run on a quiet machine)
    python benchmarks/forward.py --small         # seconds-long smoke run (B=2, T=32)
    python benchmarks/forward.py --model PATH    # any HF folder / .gguf load_model accepts
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    F32_MATMUL_PEAK_GFLOPS,
    load_report,
    machine_info,
    print_table,
    time_calls,
    write_results,
)


def _torch_twin(model):
    """transformers model with exactly ``model``'s weights (no random init of a second copy)."""
    import torch
    import transformers

    from opd_jax.model.hf_loader import ARCHITECTURES, to_hf_config, to_hf_state_dict

    hf_cfg_dict = to_hf_config(model.config)
    arch = hf_cfg_dict["architectures"][0]
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = cfg_cls(**hf_cfg_dict)
    with torch.device("meta"):
        hf = getattr(transformers, arch)(config)
    state = {k: torch.from_numpy(v) for k, v in to_hf_state_dict(model.config, model.params).items()}
    hf.load_state_dict(state, strict=False, assign=True)
    rotary = type(hf.model.rotary_emb)
    hf.model.rotary_emb = rotary(config=config)  # non-persistent inv_freq buffer, off meta
    assert ARCHITECTURES[arch] == model.config.family
    return hf.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="smoke run: B=2, T=32, 2 repeats")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    p.add_argument("--max-load-per-core", type=float, default=0.25)
    p.add_argument("--out", default=None, help="JSON path (default results/forward[_small].json)")
    args = p.parse_args(argv)
    if args.small:
        args.batch, args.seq, args.repeats = 2, 32, 2

    load_before = load_report(args.max_load_per_core)
    import jax
    import jax.numpy as jnp

    from opd_jax.model.assets import default_teacher
    from opd_jax.model.loading import load_model

    model = load_model(args.model) if args.model else default_teacher()
    config = model.config
    B, T = args.batch, args.seq
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (B, T), dtype=np.int64)
    tokens_j = jnp.asarray(tokens, jnp.int32)
    flops_per_call = config.flops_per_token(context=T) * B * T

    rows, results = [], {}

    def record(name: str, timing: dict) -> None:
        t = timing["median_s"]
        gflops = flops_per_call / t / 1e9
        results[name] = {**timing, "tokens_per_s": B * T / t, "gflops": gflops,
                         "mfu_vs_f32_peak": gflops / F32_MATMUL_PEAK_GFLOPS}

    ours_logits = None

    def ours():
        nonlocal ours_logits
        ours_logits = model.logits(tokens_j)
        return ours_logits

    record("opd_jax", time_calls(ours, warmup=1, repeats=args.repeats))

    max_diff = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch/transformers not installed: skipping the transformers baseline")
        else:
            hf = _torch_twin(model)
            tokens_t = torch.from_numpy(tokens)
            hf_out = {}

            def theirs():
                with torch.no_grad():
                    hf_out["logits"] = hf(tokens_t).logits
                return None

            record("transformers", time_calls(theirs, warmup=1, repeats=args.repeats))
            max_diff = float(np.abs(np.asarray(ours_logits) - hf_out["logits"].numpy()).max())
            results["transformers"]["torch_threads"] = torch.get_num_threads()

    base = results.get("transformers", {}).get("median_s")
    for name, r in results.items():
        rows.append({
            "impl": name, "ms": f"{1e3 * r['median_s']:.1f}",
            "tok/s": f"{r['tokens_per_s']:,.0f}", "GFLOP/s": f"{r['gflops']:.1f}",
            "MFU": f"{100 * r['mfu_vs_f32_peak']:.1f}%",
            "ratio": f"{base / r['median_s']:.2f}x" if base else "-",
        })
    print(f"\nforward B={B} T={T} float32, {config.n_params / 1e6:.0f}M params, "
          f"{flops_per_call / 1e9:.1f} GFLOP per call, peak {F32_MATMUL_PEAK_GFLOPS:.0f} GFLOP/s")
    print_table(rows, [("impl", "impl"), ("ms", "median ms"), ("tok/s", "tokens/s"),
                       ("GFLOP/s", "GFLOP/s"), ("MFU", "of peak"),
                       ("ratio", "speed vs transformers")])
    if max_diff is not None:
        print(f"max |logit difference| opd_jax vs transformers: {max_diff:.3g}")
    load_after = load_report(args.max_load_per_core)

    write_results("forward", {
        "benchmark": "forward", "batch": B, "seq": T, "dtype": "float32",
        "model": str(args.model or "default_teacher (SmolLM2-135M-Instruct Q4_1, dequantized)"),
        "n_params": config.n_params, "flops_per_call": flops_per_call,
        "peak_gflops": F32_MATMUL_PEAK_GFLOPS, "results": results,
        "max_abs_logit_diff": max_diff, "load_before": load_before, "load_after": load_after,
        "machine": machine_info(), "jax_devices": len(jax.devices()),
    }, small=args.small, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
