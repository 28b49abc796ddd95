"""Named target sets over official module names (Black Forest Labs' Flux; the LDM/SGM UNet)."""
from __future__ import annotations

# The attention- and MLP-bearing linears of the SpatialTransformer (LDM `attention.py`) and the ResBlock /
# sampler convs (LDM `openaimodel.py`), as globs over e.g. `input_blocks.1.1.transformer_blocks.0.attn1.to_q`.
_SD_ATTN = ["*.transformer_blocks.*.attn1.to_q", "*.transformer_blocks.*.attn1.to_k",
            "*.transformer_blocks.*.attn1.to_v", "*.transformer_blocks.*.attn1.to_out.0",
            "*.transformer_blocks.*.attn2.to_q", "*.transformer_blocks.*.attn2.to_k",
            "*.transformer_blocks.*.attn2.to_v", "*.transformer_blocks.*.attn2.to_out.0"]
_SD_FF = ["*.transformer_blocks.*.ff.net.0.proj", "*.transformer_blocks.*.ff.net.2", "*.proj_in", "*.proj_out"]
_SD_RES = ["*.in_layers.2", "*.out_layers.3", "*.emb_layers.1", "*.skip_connection", "*.op", "output_blocks.*.conv"]

PRESETS: dict[str, list[str]] = {
    # the perception adapters' layers on FLUX.1: 19 fused image qkv + 38 linear1 + 38 linear2 = 95
    "omnix": ["double_blocks.*.img_attn.qkv", "single_blocks.*.linear1", "single_blocks.*.linear2"],
    # attention projections; a single block's linear1/linear2 carry its attention (fused with the MLP)
    "flux-attn": ["double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.txt_attn.qkv",
                  "double_blocks.*.txt_attn.proj", "single_blocks.*.linear1", "single_blocks.*.linear2"],
    # every linear of every block (attention, MLP, modulation), as kohya's Flux LoRA trainer
    "flux-all": ["double_blocks.*", "single_blocks.*"],
    "sd-attn": _SD_ATTN,
    # attention, feed-forward, the transformer's proj_in/out, ResBlock convs and embeddings, down/upsampler convs
    "sd-all": _SD_ATTN + _SD_FF + _SD_RES,
}
