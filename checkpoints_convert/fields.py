"""Official config fields read off an official-layout state dict's keys and shapes, for every family.

What no shape tells (Flux's RoPE axes and theta, a UNet's head count vs head width, Sana's attention heads, a VAE's
latent scale) comes from `hints` (a diffusers `config.json` beside the file, translated here, or the `zoo_fields`
safetensors metadata `convert` writes); otherwise the released value is used and listed in `assumed`.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from checkpoints_convert.families import arch_of
from checkpoints_convert.flux import flux_widths
from checkpoints_convert.keymap import block_count
from checkpoints_convert.unet import official_structure

Shapes = Mapping[str, tuple]


class _Fields:
    """Collects fields; `unknown(name, hint_value, released)` takes the hint or records the assumption."""

    def __init__(self, arch: str, hints: Mapping[str, Any]):
        self.fields: dict[str, Any] = {"arch": arch}
        self.assumed: dict[str, Any] = {}
        self.hints = hints
        self.used: set[str] = set()  # hints consumed into nested fields (not config fields of their own)

    def unknown(self, name: str, released: Any) -> Any:
        if name in self.hints:
            self.fields[name] = self.hints[name]
        else:
            self.fields[name] = self.assumed[name] = released
        return self.fields[name]

    def told(self, name: str, released: Any) -> Any:
        """As `unknown`, for a value that goes inside a nested field rather than being a field itself."""
        self.used.add(name)
        if name in self.hints:
            return self.hints[name]
        self.assumed[name] = released
        return released


def _split_axes(head_dim: int) -> list[int]:
    """Flux's (16, 56, 56) split of a 128-wide head, scaled to `head_dim` with even parts."""
    first = max(2, 2 * round(head_dim / 16))
    second = 2 * ((head_dim - first) // 4)
    return [first, second, head_dim - first - second]


def flux_fields(s: Shapes, f: _Fields) -> None:
    w = flux_widths(s)
    if w is None or w["mlp_hidden"] is None:
        raise ValueError("no Flux widths in this state dict")
    hidden, head_dim = w["hidden"], w["head_dim"]
    if head_dim is None or hidden % head_dim:
        head_dim = f.hints.get("head_dim") or 128
    f.fields.update(
        in_channels=s["img_in.weight"][1], out_channels=s["final_layer.linear.weight"][0],
        vec_in_dim=s["vector_in.in_layer.weight"][1], context_in_dim=s["txt_in.weight"][1], hidden_size=hidden,
        mlp_ratio=w["mlp_hidden"] / hidden, num_heads=hidden // head_dim, depth=w["depth"],
        depth_single_blocks=w["depth_single"],
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in s or w["depth"] == 0,
        guidance_embed="guidance_in.in_layer.weight" in s)
    f.unknown("axes_dim", [16, 56, 56] if head_dim == 128 else _split_axes(head_dim))
    f.unknown("theta", 10000)


def _level_blocks(s: Shapes) -> list[list[int]]:
    """Input-block indices of the res blocks of each level (official `input_blocks.N`)."""
    levels, n = [[]], 1
    while f"input_blocks.{n}.0.op.weight" in s or f"input_blocks.{n}.0.in_layers.2.weight" in s:
        if f"input_blocks.{n}.0.op.weight" in s:
            levels.append([])
        else:
            levels[-1].append(n)
        n += 1
    return levels


def _heads(widths: list[int], f: _Fields, ctx: int | None, proj_conv: bool) -> None:
    """num_heads or num_head_channels: a hint, else the releases' (SD1: 8 heads; SD2/SDXL: 64-wide heads)."""
    if "num_heads" in f.hints or "num_head_channels" in f.hints:
        f.fields["num_heads"] = f.hints.get("num_heads", -1)
        f.fields["num_head_channels"] = f.hints.get("num_head_channels", -1)
    elif ctx == 768 and proj_conv or any(w % 64 for w in widths):
        f.fields["num_heads"] = f.assumed["num_heads"] = 8 if all(w % 8 == 0 for w in widths) else 1
    else:
        f.fields["num_head_channels"] = f.assumed["num_head_channels"] = 64


def _context_dims(s: Shapes, st, levels: list[list[int]], widths: list[int]) -> dict[str, Any]:
    """`context_dim` (one width for every attn2) or `cross_attention_dim` (one per level: LBM), read off each
    level's attn2.to_k; {} without cross-attention. The middle block must share the last level's width."""
    n_levels, dims = len(widths), {}  # level (-1: middle) -> {widths of its attn2.to_k}
    in_level = {n: i for i, lv in enumerate(levels) for n in lv}  # input block (with a res block) -> level
    out_level = [n_levels - 1 - i for i, lv in enumerate(st.up) for _ in lv.attn]  # output block -> level
    for k, shape in s.items():
        if not k.endswith("attn2.to_k.weight"):
            continue
        where, n = k.split(".")[:2]
        if where == "middle_block":
            level = -1
        else:
            level = (out_level if where == "output_blocks" else in_level)[int(n)]
        dims.setdefault(level, set()).add(shape[1])
    if not dims:
        return {}
    if any(len(v) != 1 for v in dims.values()):
        raise ValueError(f"UNet cross-attention widths per level (-1: middle) {dims}: not one width per level")
    dims = {lv: v.pop() for lv, v in dims.items()}
    if len(set(dims.values())) == 1:
        return {"context_dim": next(iter(dims.values()))}
    last = dims.get(n_levels - 1, dims.get(-1))
    if dims.get(-1, last) != last:
        raise ValueError(f"the middle block's cross-attention width {dims[-1]} differs from the last level's {last}")
    # levels without attention keep their own width, as LBM's official config gives them
    return {"cross_attention_dim": [dims.get(lv, widths[lv] if lv < n_levels - 1 else last)
                                    for lv in range(n_levels)]}


def _encoder_fields(s: Shapes, f: _Fields) -> None:
    """The UNet encoder's fields (UNet and ControlNet alike)."""
    keys = set(s)
    st = official_structure(keys)
    ch = s["input_blocks.0.0.weight"][0]
    levels = _level_blocks(s)
    if len(levels) != len(st.down):
        raise ValueError(f"UNet levels disagree: {len(levels)} by blocks, {len(st.down)} by structure")
    widths = [s[f"input_blocks.{lv[0]}.0.out_layers.3.weight"][0] if lv else ch for lv in levels]
    depths = [max(lv.attn, default=0) for lv in st.down]
    nres = [len(lv.attn) for lv in st.down]
    proj = next((s[k] for k in sorted(keys) if k.endswith(".proj_in.weight")), None)
    f.fields.update(
        in_channels=s["input_blocks.0.0.weight"][1], model_channels=ch, channel_mult=[w // ch for w in widths],
        num_res_blocks=nres[0] if len(set(nres)) == 1 else nres,
        attention_resolutions=[2 ** i for i, d in enumerate(depths) if d],
        transformer_depth=[d or 1 for d in depths], context_dim=None,
        use_linear_in_transformer=proj is not None and len(proj) == 2,
        use_scale_shift_norm=s[f"input_blocks.{levels[0][0]}.0.emb_layers.1.weight"][0] == 2 * widths[0]
        if levels[0] else False)
    f.fields.update(_context_dims(s, st, levels, widths))
    if st.mid_depth:
        f.fields["transformer_depth_middle"] = st.mid_depth
    else:
        f.fields["disable_middle_transformer"] = True
    if "label_emb.weight" in s:
        f.fields["num_classes"] = s["label_emb.weight"][0]
    elif "label_emb.0.0.weight" in s:
        f.fields.update(num_classes="sequential", adm_in_channels=s["label_emb.0.0.weight"][1])
    _heads([w for w, d in zip(widths, depths) if d] + ([widths[-1]] if st.mid_depth else []), f,
           f.fields["context_dim"], proj is not None and len(proj) == 4)


def unet_fields(s: Shapes, f: _Fields) -> None:
    _encoder_fields(s, f)
    f.fields["out_channels"] = s["out.2.weight"][0]


def controlnet_fields(s: Shapes, f: _Fields) -> None:
    _encoder_fields(s, f)
    f.fields["hint_channels"] = s["input_hint_block.0.weight"][1]


def t2i_adapter_fields(s: Shapes, f: _Fields) -> None:
    blocks = block_count(s, "body")
    downs = [i for i in range(1, blocks) if f"body.{i}.down_opt.op.weight" in s] or \
        [i for i in range(1, blocks) if f"body.{i}.in_conv.weight" in s or f"body.{i}.skep.weight" in s]
    nums_rb = downs[0] if downs else blocks
    f.fields.update(channels=[s[f"body.{i}.block1.weight"][0] for i in range(0, blocks, nums_rb)], nums_rb=nums_rb,
                    cin=s["conv_in.weight"][1], ksize=s["body.0.block2.weight"][-1],
                    sk="body.0.skep.weight" not in s, use_conv=any(f"body.{i}.down_opt.op.weight" in s
                                                                    for i in range(blocks)))


def sana_fields(s: Shapes, f: _Fields) -> None:
    hidden, cin, p, _ = s["x_embedder.proj.weight"]
    out = s["final_layer.linear.weight"][0] // (p * p)
    f.fields.update(
        patch_size=p, in_channels=cin, hidden_size=hidden, depth=block_count(s, "blocks"),
        mlp_ratio=s["blocks.0.mlp.inverted_conv.conv.weight"][0] / 2 / hidden, pred_sigma=out == 2 * cin,
        caption_channels=s["y_embedder.y_proj.fc1.weight"][1], qk_norm="blocks.0.attn.q_norm.weight" in s,
        cross_norm="blocks.0.cross_attn.q_norm.weight" in s, y_norm="attention_y_norm.weight" in s,
        attn_type="linear", ffn_type="glumbconv", use_pe=False, multi_scale=True, mlp_acts=["silu", "silu", None],
        y_norm_scale_factor=0.01)
    if "y_embedder.y_embedding" in s:
        f.fields["model_max_length"] = s["y_embedder.y_embedding"][0]
    if "pos_embed" in s:
        f.fields["input_size"] = round(s["pos_embed"][1] ** 0.5) * p
    heads = next((hidden // d for d in (72, 112, 64, 32, 16, 8) if hidden % d == 0), 1)  # released: 72 and 112
    f.unknown("num_heads", heads)
    f.unknown("linear_head_dim", 32 if hidden % 32 == 0 else hidden // heads)
    if "input_size" not in f.fields:
        f.unknown("input_size", 32)


def autoencoder_fields(s: Shapes, f: _Fields) -> None:
    ch = s["encoder.conv_in.weight"][0]
    levels = block_count(s, "encoder.down")
    z = s["encoder.conv_out.weight"][0] // 2
    ldm = "quant_conv.weight" in s
    f.fields.update(
        layout="ldm" if ldm else "bfl", in_channels=s["encoder.conv_in.weight"][1], ch=ch,
        out_ch=s["decoder.conv_out.weight"][0], ch_mult=[s[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch
                                                         for i in range(levels)],
        num_res_blocks=block_count(s, "encoder.down.0.block"), z_channels=z)
    if ldm:
        f.fields["embed_dim"] = s["quant_conv.weight"][0] // 2
    released = {(True, 4): (0.18215, 0.0), (False, 16): (0.3611, 0.1159)}.get((ldm, z), (1.0, 0.0))
    f.unknown("scale_factor", released[0])
    f.unknown("shift_factor", released[1])


def clip_text_fields(s: Shapes, f: _Fields) -> None:
    vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
    proj = s.get("text_projection.weight")
    f.fields.update(vocab_size=vocab, hidden_size=hidden, max_position_embeddings=s[
        "text_model.embeddings.position_embedding.weight"][0],
        intermediate_size=s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=block_count(s, "text_model.encoder.layers"), with_projection=proj is not None,
        projection_dim=proj[0] if proj else hidden)
    f.unknown("num_attention_heads", max(1, hidden // 64))  # every released CLIP text encoder: 64-wide heads
    f.unknown("hidden_act", "quick_gelu" if hidden == 768 else "gelu")  # OpenAI CLIP-L vs the OpenCLIP H/G
    f.unknown("eos_token_id", 2)  # the legacy argmax pooling the released files ship with


def t5_encoder_fields(s: Shapes, f: _Fields) -> None:
    a = "encoder.block.0.layer.0.SelfAttention"
    buckets, heads = s[f"{a}.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in s
    wi = s["encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")]
    f.fields.update(vocab_size=s["shared.weight"][0] if "shared.weight" in s else s[
        "encoder.embed_tokens.weight"][0], d_model=s[f"{a}.q.weight"][1], num_heads=heads,
        d_kv=s[f"{a}.q.weight"][0] // heads, d_ff=wi[0], num_layers=block_count(s, "encoder.block"),
        relative_attention_num_buckets=buckets)
    f.unknown("feed_forward_proj", "gated-gelu" if gated else "relu")  # T5 v1.1 (Flux, SD3) vs the original T5
    f.unknown("relative_attention_max_distance", 128)


def _dc_ae_op(s: Shapes, p: str) -> tuple[str, int] | None:
    """(block type, width) of the official DC-AE block at `p`; None where `p` is a resampling op."""
    if f"{p}.main.conv1.conv.weight" in s:
        return "ResBlock", s[f"{p}.main.conv1.conv.weight"][0]
    qkv = f"{p}.context_module.main.qkv.conv.weight"
    if qkv in s:  # a 5x5 aggregation of q/k/v makes it the multi-scale EfficientViT block
        return ("EViTS5_GLU" if f"{p}.context_module.main.aggreg.0.0.weight" in s else "EViT_GLU"), s[qkv][1]
    return None


def _dc_ae_stages(s: Shapes, side: str, n: int) -> tuple[list, list, list, list[str | None], list]:
    """Per stage of `side` (encoder/decoder): widths (None where empty), depths, block types, norms, and the
    resampling op's (key prefix, output channels, has a shortcut) where the stage has one."""
    widths, depths, kinds, norms, resample = [None] * n, [0] * n, ["ResBlock"] * n, [None] * n, [None] * n
    for i in range(n):
        j = 0
        while any(k.startswith(f"{side}.stages.{i}.op_list.{j}.") for k in s):
            p = f"{side}.stages.{i}.op_list.{j}"
            op = _dc_ae_op(s, p)
            if op is None:
                main = next(k for k in (f"{p}.main.conv.conv.weight", f"{p}.main.conv.weight", f"{p}.conv.conv.weight",
                                        f"{p}.conv.weight") if k in s)
                resample[i] = (main, s[main][0], main.startswith(f"{p}.main."))
            else:
                kinds[i], widths[i], depths[i] = op[0], op[1], depths[i] + 1
                bn = any(k.startswith(p + ".") and k.endswith("norm.running_mean") for k in s)
                norms[i] = "bn2d" if bn else "trms2d"  # trms2d and rms2d are the same RMS over channels
            j += 1
    return widths, depths, kinds, norms, resample


def dc_ae_fields(s: Shapes, f: _Fields) -> None:
    n = max(block_count(s, "encoder.stages"), block_count(s, "decoder.stages"))
    ew, ed, ek, en, down = _dc_ae_stages(s, "encoder", n)
    dw, dd, dk, dn, up = _dc_ae_stages(s, "decoder", n)
    widths = [e or d for e, d in zip(ew, dw)]
    if widths[0] is None:  # an empty first stage (the mix releases) leaves its width in no shape, nor in the math
        widths[0] = widths[1] // 2
    if None in widths:
        raise ValueError("a DC-AE stage with no blocks in encoder and decoder")
    stem = next(k for k in ("encoder.project_in.conv.conv.weight", "encoder.project_in.conv.weight") if k in s)
    out = next(k for k in ("encoder.project_out.main.op_list.0.conv.weight",
                           "encoder.project_out.op_list.0.conv.weight") if k in s)
    # the encoder's resampling op: the stride-2 conv (the Sana release) or a conv before space-to-channel
    d_key, d_out, d_short = next((r for r in down if r), (stem, s[stem][0], False))
    d_kind = "ConvPixelUnshuffle" if d_key.endswith("conv.conv.weight") else "Conv"
    u_key, u_out, u_short = next((r for i, r in enumerate(up) if r), (None, None, True))
    u_widths = [w for r, w in zip(up, widths) if r]
    u_kind = "ConvPixelShuffle" if u_key and u_out == 4 * u_widths[0] else "InterpolateConv"
    f.fields.update(in_channels=s[stem][1], latent_channels=s[out][0], use_quant_conv=False, encoder=dict(
        width_list=widths, depth_list=ed, block_type=ek, norm=next((x for x in en if x), "trms2d"),
        downsample_block_type=d_kind, downsample_shortcut="averaging" if d_short else None,
        out_shortcut="averaging" if ".main." in out else None), decoder=dict(
        width_list=widths, depth_list=dd, block_type=dk, norm=[x or next((y for y in dn if y), "trms2d") for x in dn],
        upsample_block_type=u_kind, upsample_shortcut="duplicating" if u_short else None,
        in_shortcut="duplicating" if "decoder.project_in.main.conv.weight" in s else None,
        out_norm=("bn2d" if "decoder.project_out.op_list.0.running_mean" in s else "trms2d")
        if "decoder.project_out.op_list.0.weight" in s else None))
    # activations have no weights: the releases' SiLU, and ReLU where the decoder's stage uses BatchNorm, ReLU out
    f.fields["encoder"]["act"] = f.told("act", "silu")
    f.fields["decoder"]["act"] = f.told("decoder_act", ["relu" if x == "bn2d" else "silu"
                                                        for x in f.fields["decoder"]["norm"]])
    f.fields["decoder"]["out_act"] = f.told("decoder_out_act", "relu")
    f.unknown("scaling_factor", 0.41407 if d_kind == "Conv" else 1.0)  # Sana's release; the mix ones name none


def gemma2_fields(s: Shapes, f: _Fields) -> None:
    vocab, hidden = s["embed_tokens.weight"]
    q, kv = s["layers.0.self_attn.q_proj.weight"][0], s["layers.0.self_attn.k_proj.weight"][0]
    f.fields.update(vocab_size=vocab, hidden_size=hidden, intermediate_size=s["layers.0.mlp.gate_proj.weight"][0],
                    num_hidden_layers=block_count(s, "layers"), attention_bias="layers.0.self_attn.q_proj.bias" in s)
    # q and k widths are heads x head_dim: the split comes from config.json, else the widest released head dividing both
    told = f.hints.get("num_attention_heads")
    head_dim = f.unknown("head_dim", q // told if told else next(d for d in (256, 128, 64, 32, 16, 8, 4, 2, 1)
                                                                   if q % d == 0 and kv % d == 0))
    f.fields.update(num_attention_heads=q // head_dim, num_key_value_heads=kv // head_dim)
    f.unknown("query_pre_attn_scalar", head_dim)  # gemma-2-2b / 9b: the head width
    f.unknown("sliding_window", 4096)
    f.unknown("attn_logit_softcapping", 50.0)


READERS: dict[str, Callable[[Shapes, _Fields], None]] = {
    "flux": flux_fields, "unet": unet_fields, "controlnet": controlnet_fields, "t2i_adapter": t2i_adapter_fields,
    "sana": sana_fields, "autoencoder": autoencoder_fields, "clip_text": clip_text_fields,
    "t5_encoder": t5_encoder_fields, "dc_ae": dc_ae_fields, "gemma2": gemma2_fields,
}
# transformers config.json names are the zoo field names of the text encoders: taken as they are
TEXT_HINTS = {"clip_text": ("num_attention_heads", "hidden_act", "eos_token_id", "bos_token_id", "pad_token_id",
                            "layer_norm_eps"),
              "t5_encoder": ("feed_forward_proj", "relative_attention_max_distance", "layer_norm_epsilon"),
              "gemma2": ("num_attention_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
                         "attn_logit_softcapping", "rms_norm_eps", "hidden_activation", "rope_parameters", "rope_theta",
                         "layer_types", "pad_token_id", "bos_token_id", "eos_token_id")}


def _unet_heads_hint(cfg: Mapping[str, Any], widths: list[int]) -> dict[str, int]:
    """diffusers' `attention_head_dim` (really the head count, per level) -> num_heads or num_head_channels."""
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
    if heads is None or not widths:
        return {}
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    if len(set(heads)) == 1:
        return {"num_heads": heads[0]}
    dims = {w // h for w, h in zip(widths, heads)}
    return {"num_head_channels": dims.pop()} if len(dims) == 1 else {}


def hints_from(family: str, config: Mapping[str, Any] | None, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """Official field values no shape tells, from a diffusers `config.json` and our `zoo_fields` metadata."""
    out: dict[str, Any] = {}
    cfg = config or {}
    if family == "flux" and cfg:
        out.update({k: v for k, v in (("axes_dim", cfg.get("axes_dims_rope")),
                                      ("head_dim", cfg.get("attention_head_dim"))) if v is not None})
        if "axes_dim" in out:
            out["axes_dim"] = list(out["axes_dim"])
            out.setdefault("theta", 10000)  # diffusers' Flux has no theta argument: always the released 10000
    elif family in ("unet", "controlnet") and cfg:
        out.update(_unet_heads_hint(cfg, list(cfg.get("block_out_channels") or [])))
    elif family == "sana" and cfg:
        out.update({k: cfg[d] for k, d in (("num_heads", "num_cross_attention_heads"),
                                           ("linear_head_dim", "attention_head_dim"), ("input_size", "sample_size"))
                    if cfg.get(d) is not None})
    elif family == "autoencoder" and cfg:
        out.update({"scale_factor": cfg.get("scaling_factor", 0.18215), "shift_factor": cfg.get("shift_factor") or 0.0})
    elif family == "dc_ae" and cfg:  # diffusers' AutoencoderDC: its encoder is always SiLU
        acts = cfg.get("decoder_act_fns", "silu")
        n = len(cfg.get("decoder_block_out_channels") or ()) or 1
        out.update(act="silu", decoder_act=[acts] * n if isinstance(acts, str) else list(acts),
                   decoder_out_act=cfg.get("decoder_conv_act_fn", "relu"),
                   scaling_factor=cfg.get("scaling_factor", 1.0))
    elif family in TEXT_HINTS and cfg:
        text = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
        out.update({k: text[k] for k in TEXT_HINTS[family] if text.get(k) is not None})
    if metadata and "zoo_fields" in metadata:
        try:
            out.update(json.loads(metadata["zoo_fields"]))
        except ValueError:
            pass  # not ours: ignore
    return out


def read_fields(family: str, shapes: Shapes, hints: Mapping[str, Any] | None = None
                ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(official config fields with `arch`, the ones assumed) of an official-layout model; (None, {}) if unread."""
    reader = READERS.get(family)
    if reader is None:
        return None, {}
    f = _Fields(arch_of(family), hints or {})
    try:
        reader(shapes, f)
    except (KeyError, ValueError, IndexError, TypeError, ZeroDivisionError):
        return None, {}  # a pruned or unusual file: zoo.load then asks for a config
    for k, v in f.hints.items():  # other told fields (eps, token ids, ...) as given
        if k not in f.fields and k != "head_dim" and k not in f.used:
            f.fields[k] = v
    return f.fields, f.assumed
