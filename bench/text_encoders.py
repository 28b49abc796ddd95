"""Text encoders: ours vs transformers on the same weights (fp32, CPU, batch 4).

    python bench/text_encoders.py [--threads 2 --repeats 5]

- CLIP-L text encoder at full size (123 M parameters), 77 tokens (SD/Flux prompts: BOS, words, EOS, EOS padding);
- a T5 v1.1 encoder at a mid config (d_model 1024, d_ff 2816, 16 heads x 64, 8 layers: T5-v1.1-large's width at a
  third of its depth), 256 tokens (Flux-schnell's length) with the last 100 of two prompts padded and masked.
The peers run with transformers' default attention (SDPA). Prints median seconds of each (calls interleaved, so
load from elsewhere hits both alike), the ratio ours/transformers, the peak RSS growth of one forward and its
ratio, and the max difference of the last hidden states relative to their scale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402
from bench.common import exact_rss, median_times, peak_rss_during  # noqa: E402
from bench.pairs import randomize, rel_err  # noqa: E402

BATCH = 4
T5_MID = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=8, num_heads=16,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
              feed_forward_proj="gated-gelu")


def clip_l():
    import transformers

    cfg = zoo.get_config("clip-l")
    fields = {k: v for k, v in vars(cfg).items() if k != "with_projection"}
    peer = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**fields))).eval()
    ours = zoo.build("clip-l", device="meta")
    # transformers 5 drops the `text_model.` prefix that the files (and our native names) carry
    sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in peer.state_dict().items()}
    ours.load_state_dict(sd, strict=True, assign=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.full((BATCH, 77), 49407)  # EOS padding, as SD's CLIP tokenizer pads
    ids[:, 0] = 49406
    for i, n in enumerate((5, 20, 40, 75)):
        ids[i, 1:n + 1] = torch.randint(1, 49405, (n,), generator=g)
    return ("CLIP-L, 77 tokens", lambda: ours.eval()(ids)[0], lambda: peer(input_ids=ids).last_hidden_state)


def t5_mid():
    import transformers

    peer = randomize(transformers.T5EncoderModel(transformers.T5Config(**T5_MID))).eval()
    ours = zoo.build({"arch": "t5_encoder", **T5_MID}, device="meta")
    ours.load_state_dict(peer.state_dict(), strict=True, assign=True)
    ids = torch.randint(2, 32000, (BATCH, 256), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(BATCH, 256, dtype=torch.long)
    mask[2:, 156:] = 0
    ids[2:, 155], ids[2:, 156:] = 1, 0  # EOS, then padding
    return ("T5 mid (1024 wide, 8 layers), 256 tokens", lambda: ours.eval()(ids, attention_mask=mask),
            lambda: peer(input_ids=ids, attention_mask=mask).last_hidden_state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    exact_rss()
    torch.set_num_threads(args.threads)
    print(f"fp32, batch {BATCH}, {args.threads} threads, median of {args.repeats} interleaved calls")
    for build in (clip_l, t5_mid):
        label, ours, peer = build()
        with torch.inference_mode():
            err = rel_err(ours(), peer())
            times = median_times({"zoo": ours, "transformers": peer}, args.repeats)
            mem = {"zoo": peak_rss_during(ours)[1] / 2**20, "transformers": peak_rss_during(peer)[1] / 2**20}
        print(f"\n{label}: last hidden state max rel diff {err:.1e}")
        for impl in times:
            print(f"{impl:13s} median {times[impl] * 1e3:9.1f} ms   peak RSS +{mem[impl]:7.1f} MB")
        print(f"ratio zoo/transformers: time {times['zoo'] / times['transformers']:.3f}, peak memory "
              f"{mem['zoo'] / max(mem['transformers'], 1e-9):.3f}", flush=True)


if __name__ == "__main__":
    main()
