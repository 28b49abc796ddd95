"""Our Flux vs diffusers' FluxTransformer2DModel on the same weights and inputs (fp32, CPU).

    python bench/flux_forward.py [--threads 2 --repeats 5]

Config: hidden 1024, 16 heads, 2 double + 4 single blocks, 1024 image + 128 text tokens, batch 1.
Prints median time of each, the ratio ours/diffusers, peak RSS growth during a forward, the forward's FLOPs
and achieved GFLOP/s as a fraction of an fp32 GEMM measured in the same run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402
from bench.common import count_flops, exact_rss, gemm_gflops, median_times, peak_rss_during  # noqa: E402
from checkpoints_convert import flux_from_diffusers  # noqa: E402
from zoo.flux import img_ids, txt_ids  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--img-tokens", type=int, default=1024)
    ap.add_argument("--txt-tokens", type=int, default=128)
    args = ap.parse_args()
    exact_rss()
    torch.set_num_threads(args.threads)
    import diffusers

    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=16, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 24, 24)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ours = zoo.build("flux-dev", hidden_size=1024, num_heads=16, depth=2, depth_single_blocks=4,
                     axes_dim=[16, 24, 24]).eval()
    ours.load_state_dict(flux_from_diffusers(ref.state_dict()), strict=True)

    side = int(args.img_tokens**0.5)
    img = torch.randn(1, side * side, 64)
    txt = torch.randn(1, args.txt_tokens, 4096)
    y, t, g = torch.randn(1, 768), torch.tensor([0.7]), torch.tensor([3.5])
    iid, tid = img_ids(1, 2 * side, 2 * side), txt_ids(1, args.txt_tokens)

    def run_ours():
        return ours(img, iid, txt, tid, t, y, guidance=g)

    def run_ref():
        return ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                   img_ids=iid[0], txt_ids=tid[0], guidance=g, return_dict=False)[0]

    with torch.inference_mode():
        err = (run_ours() - run_ref()).abs().max().item()
        flops = count_flops(run_ours)
        peak = gemm_gflops()
        times = median_times({"diffusers": run_ref, "zoo": run_ours}, args.repeats)
        t_ref, t_ours = times["diffusers"], times["zoo"]
        _, mem_ref = peak_rss_during(run_ref)
        _, mem_ours = peak_rss_during(run_ours)
    print(f"threads {args.threads}, {side * side} image + {args.txt_tokens} text tokens, fp32, max |diff| {err:.2e}")
    print(f"forward FLOPs {flops / 1e9:.1f} G; fp32 GEMM peak measured now {peak:.1f} GFLOP/s")
    print(f"{'':10s} {'median s':>9s} {'GFLOP/s':>8s} {'of peak':>8s} {'peak RSS +MB':>13s}")
    for name, sec, mem in (("diffusers", t_ref, mem_ref), ("zoo", t_ours, mem_ours)):
        print(f"{name:10s} {sec:9.4f} {flops / sec / 1e9:8.1f} {flops / sec / 1e9 / peak:8.1%} {mem / 2**20:13.1f}")
    print(f"ratio zoo/diffusers: time {t_ours / t_ref:.3f}, peak memory {mem_ours / max(mem_ref, 1):.3f}")


if __name__ == "__main__":
    main()
