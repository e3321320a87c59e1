"""Decode attention over a paged KV cache: the Triton kernel against flash-attn and SDPA.

One decode step (one query token per sequence) over a sweep of context lengths, same data for all:
* ``triton``: ``spice_fast.kernels.paged_attention.paged_decode_attention`` (block size 16 pages),
* ``flash``: flash-attn's ``flash_attn_with_kvcache`` with a block table (pages of 256, its minimum),
* ``sdpa``: PyTorch SDPA over contiguous per-sequence K/V (no paging: the unpaged ceiling),
* ``torch ref``: the gather + SDPA reference,
* ``c++``: ``paged_decode_attention_cpu``, the C++ kernel reading the blocks in place (CPU only; what
  the engine runs there).
Reports microseconds, the ratio against SDPA and the achieved KV read bandwidth (GB/s) against the
device's HBM peak. On a CPU the reference, the C++ kernel and SDPA run.

    python benches/bench_paged_attention.py --batch 64 --ctx 512,2048,8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_json, print_table, time_fn  # noqa: E402
from spice_fast.kernels.paged_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_cpu,
    paged_decode_attention_ref,
)

HBM_PEAK_BYTES = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}


def paged_copy(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, Hkv, D] contiguous K -> pool [B * S / page, page, Hkv, D] and tables (shuffled pages)."""
    b, s, h, d = k.shape
    pages = s // page
    pool = k.reshape(b * pages, page, h, d)
    perm = torch.randperm(b * pages, device=k.device)
    shuffled = torch.empty_like(pool)
    shuffled[perm] = pool
    tables = perm.view(b, pages).to(torch.int32)
    return shuffled, tables


def implementations(q, k, v, lens, scale, flash_attn_with_kvcache) -> dict:
    """name -> zero-argument callable, all computing the same attention."""
    hkv, d = k.shape[2], k.shape[3]
    k16, t16 = paged_copy(k, 16)
    v16 = torch.empty_like(k16)
    v16[t16.flatten().long()] = v.reshape(-1, 16, hkv, d)
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(
            q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), scale=scale, enable_gqa=True
        ),
        "torch ref": lambda: paged_decode_attention_ref(q, k16, v16, t16, lens, scale),
    }
    if not q.is_cuda:
        fns["c++"] = lambda: paged_decode_attention_cpu(q, k16, v16, t16, lens, scale)
    if q.is_cuda:
        fns["triton"] = lambda: paged_decode_attention(q, k16, v16, t16, lens, scale)
        if flash_attn_with_kvcache is not None:
            k256, t256 = paged_copy(k, 256)
            v256 = torch.empty_like(k256)
            v256[t256.flatten().long()] = v.reshape(-1, 256, hkv, d)
            fns["flash"] = lambda: flash_attn_with_kvcache(
                q[:, None], k256, v256, cache_seqlens=lens, block_table=t256, softmax_scale=scale
            )
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ctx", default=None, help="comma-separated context lengths (multiples of 256)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ctxs = [
        int(c) for c in (args.ctx or ("512,2048,8192" if device.type == "cuda" else "256,1024")).split(",")
    ]
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    peak = next((v for k, v in HBM_PEAK_BYTES.items() if k in torch.cuda.get_device_name(device)), None) if (
        device.type == "cuda"
    ) else None  # fmt: skip

    rows, results = [], []
    b, hq, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    for ctx in ctxs:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, hq, d, device=device, dtype=dtype, generator=gen)
        k = torch.randn(b, ctx, hkv, d, device=device, dtype=dtype, generator=gen)
        v = torch.randn(b, ctx, hkv, d, device=device, dtype=dtype, generator=gen)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
        kv_bytes = 2 * k.numel() * k.element_size()
        fns = implementations(q, k, v, lens, scale, flash_attn_with_kvcache)
        expected = fns["sdpa"]().squeeze(2).float()
        for name, fn in fns.items():
            out = fn()
            out = out.squeeze(2) if name == "sdpa" else out.squeeze(1) if name == "flash" else out
            torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
        times = {name: time_fn(fn, device=device, warmup=3, repeat=20) for name, fn in fns.items()}
        for name, t in times.items():
            gbs = kv_bytes / t / 1e9
            rows.append(
                [ctx, name, t * 1e6, times["sdpa"] / t, gbs, f"{gbs * 1e9 / peak:.0%}" if peak else "-"]
            )
            results.append(
                {"ctx": ctx, "impl": name, "us": t * 1e6, "vs_sdpa": times["sdpa"] / t, "GBps": gbs}
            )
    print(f"paged decode attention, B={b}, heads {hq}/{hkv}, head_dim {d}, {dtype}, {args.device}")
    print_table(["ctx", "impl", "us", "x sdpa", "GB/s", "of HBM peak"], rows)
    print_json(
        "paged_attention", device, results, batch=b, heads=hq, kv_heads=hkv, head_dim=d, dtype=str(dtype)
    )


if __name__ == "__main__":
    main()
