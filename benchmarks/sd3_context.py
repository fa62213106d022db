"""FLOPs of the SD3 stage-1 denoiser call on the stock context (CLIP part + 256 zero T5 positions) against the
collapsed one vlv trains on (CLIP part + the T5 tail of ``vlv.decoders.sd3.tail_biases``: 1 key in fp32, 2 in
bf16), on a real architecture built on the meta device (no weights, no memory):

    python benchmarks/sd3_context.py --size 512 --nq 77 [--config transformer.json] [--json out.json]

Without --config the transformer is SD 3.5 Medium's as published (24 layers, 24 heads x 64, dual attention in
layers 0-12, qk RMS-norm, 16 latent channels, patch 2); a diffusers dir's ``transformer/config.json`` is the
other choice. Counted by torch.utils.flop_counter over forward and backward (gradients reach the context, as
they reach z in stage 1), batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import write_result  # benchmarks/

SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
               "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
               "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
               "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"}


def step_flops(transformer, latent: int, nq: int, tail: list[float] | None) -> float:
    """Forward + backward FLOPs of one denoiser call at ``latent`` x ``latent`` latents, batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlv.decoders.sd3 import T5_LENGTH, repeated_tail_bias

    cfg = transformer.config
    t5 = len(tail) if tail else T5_LENGTH
    context = torch.randn(1, nq + t5, cfg.joint_attention_dim, device="meta", requires_grad=True)
    latents = torch.randn(1, cfg.in_channels, latent, latent, device="meta")
    keys = (latent // cfg.patch_size) ** 2 + nq + t5
    kwargs = {"attention_mask": repeated_tail_bias(keys, tail, "meta")} if tail else None
    with FlopCounterMode(display=False) as counter:
        out = transformer(hidden_states=latents, timestep=torch.ones(1, device="meta"), encoder_hidden_states=context,
                          pooled_projections=torch.randn(1, cfg.pooled_projection_dim, device="meta"),
                          joint_attention_kwargs=kwargs, return_dict=False)[0]
        out.sum().backward()
    return float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="a transformer config.json (default: SD 3.5 Medium)")
    p.add_argument("--size", type=int, default=512, help="image side in px (the VAE downsamples 8x)")
    p.add_argument("--nq", type=int, default=77, help="z's positions")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    from diffusers import SD3Transformer2DModel

    from vlv.decoders.sd3 import KeyBiasJointAttnProcessor, tail_biases

    config = json.loads(args.config.read_text()) if args.config else SD35_MEDIUM
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(config)
    transformer.set_attn_processor(KeyBiasJointAttnProcessor())
    transformer.requires_grad_(False)
    latent = args.size // 8
    stock = step_flops(transformer, latent, args.nq, None)
    out = {"config": str(args.config or "SD 3.5 Medium"), "size": args.size, "nq": args.nq,
           "params": sum(p.numel() for p in transformer.parameters()), "stock_tflop": stock / 1e12}
    print(f"SD3 transformer ({out['params'] / 1e9:.2f} B parameters), {args.size} px, z of {args.nq} positions, "
          f"forward + backward, batch 1:")
    print(f"  stock context ({args.nq} + 256 positions): {stock / 1e12:.3f} TFLOP")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        tail = tail_biases(256, dtype)
        flops = step_flops(transformer, latent, args.nq, tail)
        out[f"collapsed_{name}_tflop"] = flops / 1e12
        out[f"collapsed_{name}_ratio"] = round(stock / flops, 3)
        print(f"  collapsed, {name} attention ({args.nq} + {len(tail)}): {flops / 1e12:.3f} TFLOP, "
              f"{stock / flops:.3f}x fewer")
    write_result(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
