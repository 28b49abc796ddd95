"""`zoo.load`: build a model on `meta` and assign it the tensors of a checkpoint in any supported layout.

Nothing is allocated for the model itself: each tensor comes from the memory-mapped file (converted to the
official layout and to the requested dtype on the way) and becomes the parameter (`load_state_dict(assign=True)`),
so peak memory stays near one copy of the weights. `dtype` is how the Linear/Conv weights are stored;
`compute_dtype` what they are upcast to for each matmul (`layers.cast`), e.g. fp8 or bf16 storage computed in
fp32 on a CPU without bf16 units.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from checkpoints_convert.convert import key_map, parse_dtype, select
from checkpoints_convert.detect import DetectError, Detection, detect
from checkpoints_convert.families import family_of
from checkpoints_convert.io import Checkpoint, load_file
from checkpoints_convert.keymap import KeyMapError
from checkpoints_convert.quant import bnb_kind
from checkpoints_convert.summary import summarize
from layers import CAST_OF, CASTS, CastLinear, cast_layers, gguf
from zoo.registry import CONFIG_DIR, build, get_config, list_models

# diffusers drops Sana's `pos_embed` and `y_embedder.y_embedding` (the forward uses neither): its key map remakes
# them as zeros, shaped by these config fields
_REMADE = {"sana": (("pos_embed", "y_embedder.y_embedding"),
                    lambda c: {"sample_size": c.input_size, "model_max_length": c.model_max_length})}

TIED = {"t5_encoder": ("shared.weight", "encoder.embed_tokens.weight")}


class LoadError(ValueError):
    """Checkpoint and model disagree: the message lists missing, unexpected and mis-shaped keys together."""


@dataclasses.dataclass
class LoadReport:
    """Keys the model expects but the checkpoint lacks, keys it has that the model lacks, and shape mismatches."""

    missing: dict[str, tuple] = dataclasses.field(default_factory=dict)  # key -> expected shape
    unexpected: dict[str, tuple] = dataclasses.field(default_factory=dict)  # key -> shape in the file
    mismatched: dict[str, tuple[tuple, tuple]] = dataclasses.field(default_factory=dict)  # key -> (file, expected)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        if self.ok:
            return "all keys matched"
        lines = [f"missing {k}: expected {list(s)}" for k, s in self.missing.items()]
        lines += [f"unexpected {k}: {list(s)}" for k, s in self.unexpected.items()]
        lines += [f"mis-shaped {k}: file {list(a)}, expected {list(b)}" for k, (a, b) in self.mismatched.items()]
        head = (f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} mis-shaped "
                "key(s)")
        more = f"\n  ... and {len(lines) - 40} more" if len(lines) > 40 else ""
        return head + ":\n  " + "\n  ".join(lines[:40]) + more


def which_config(sd: Mapping[str, Tensor], det: Detection | None = None) -> tuple[str | None, Any, nn.Module,
                                                                               Mapping[str, Tensor]]:
    """The config a checkpoint loads with: (shipped name or None, config, its model on meta, the checkpoint in the
    official layout). A shipped config with exactly its keys and shapes wins, else the fields read off them."""
    det = detect(sd) if det is None else det
    if det.family == "lora":
        raise DetectError(f"this is a LoRA ({det.layout}, {det.note}): load its base model with zoo.load, then "
                          "apply the LoRA with the `lora` package")
    if det.arch is None:
        raise DetectError(f"this checkpoint holds {det}, which zoo.load does not build; pass a config")
    det, sub = select(sd, det.family, det)
    remade = _REMADE[det.family][0] if det.family in _REMADE and det.layout == "diffusers" else ()
    official = _to_official(det, sub)
    shapes = {k: tuple(v.shape) for k, v in official.items() if k not in remade}
    names = [det.config] if det.config in list_models(det.arch) else []
    names += [n for n in list_models(det.arch) if n not in names]
    for name in names:
        built = {k: s for k, s in shipped_shapes(name).items() if k not in remade}
        if built == shapes and _agrees(get_config(name), det):
            config = get_config(name)
            return name, config, build(name, device="meta"), _to_official(det, sub, config) if remade else official
    if det.fields:
        config = get_config(det.fields)
        model = build(config, device="meta")
        built = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in remade}
        if built != shapes:
            wrong = sorted(k for k in built.keys() | shapes.keys() if built.get(k) != shapes.get(k))
            raise DetectError(f"this checkpoint holds {det}; the config read off its shapes ({det.fields}) builds a "
                              f"model whose keys/shapes differ at {wrong[:8]}; pass its config to zoo.load")
        return None, config, model, _to_official(det, sub, config) if remade else official
    raise DetectError(f"this checkpoint holds {det} but no shipped config has its keys and shapes "
                      f"(tried {names}); pass its config to zoo.load (a YAML path or a dict)")


def shipped_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """A shipped config's state-dict keys and shapes, built on meta once per process (again if its YAML changes)."""
    stamp = (name, (CONFIG_DIR / f"{name}.yaml").stat().st_mtime_ns)
    if stamp not in _SHAPES:
        _SHAPES[stamp] = {k: tuple(v.shape) for k, v in build(name, device="meta").state_dict().items()}
    return _SHAPES[stamp]


_SHAPES: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}


def _refuse_bnb(sd: Mapping[str, Tensor]) -> None:
    bnb = bnb_kind(sd)
    if bnb is not None:
        raise LoadError(f"this file is {bnb[0]}-quantised ({len(bnb[1])} packed layers, e.g. {bnb[1][0]}): zoo.load "
                        "does not dequantise bitsandbytes files; load the unquantised release (or a GGUF file), or "
                        "dequantise it with bitsandbytes first")


def _agrees(config: Any, det: Detection) -> bool:
    """Whether a shipped config has the values config.json / our metadata give for what no shape tells."""
    if not det.hints:
        return True
    try:
        hinted = get_config(det.fields)
    except (ValueError, TypeError):
        return True  # the told values do not make a config of their own: the shapes decide
    for k in det.hints:
        if k in ("num_heads", "num_head_channels") and hasattr(config, "heads"):  # the same heads, either way
            widths = [config.model_channels * m for m in config.channel_mult]
            if [config.heads(w) for w in widths] != [hinted.heads(w) for w in widths]:
                return False
        elif getattr(config, k, None) != getattr(hinted, k, None):
            return False
    return True


def _official(sd: Mapping[str, Tensor], arch: str, config: Any = None) -> Mapping[str, Tensor]:
    """The model of `arch` in the file, prefix stripped, in the official layout (views where possible)."""
    family = family_of(arch)
    if family is None:
        return sd  # an arch with no detection signature: keys are taken as they are
    try:
        det, sub = select(sd, family)
    except DetectError:
        try:
            held = detect(sd)
        except DetectError:
            return sd  # not recognisable (e.g. a pruned file): compare keys as they are, the report says what is off
        raise LoadError(f"this file holds {_family_name(held)} ({held.layout} layout), not {family}: load it with "
                        f"zoo.load(None, FILE) or a {held.family} config") from None
    return _to_official(det, sub, config)


def _family_name(det: Detection) -> str:
    names = {"unet": "a UNet", "flux": "a Flux transformer", "sana": "a Sana transformer", "lora": "a LoRA",
             "controlnet": "a ControlNet", "t2i_adapter": "a T2I-Adapter", "autoencoder": "an AutoencoderKL",
             "dc_ae": "a DC-AE autoencoder"}
    return names.get(det.family, det.family)


def _to_official(det: Detection, sub: Mapping[str, Tensor], config: Any = None) -> Mapping[str, Tensor]:
    """A prefix-stripped model of detection `det` -> the official layout (diffusers' dropped buffers remade)."""
    if det.family in TIED:  # files store a tied embedding once: the model lists it under both names
        a, b = TIED[det.family]
        if (a in sub) != (b in sub):
            sub = {**sub, a: sub.get(a, sub.get(b)), b: sub.get(b, sub.get(a))}
    if det.layout == "official":
        return sub
    kwargs = _REMADE[det.family][1](config) if det.family in _REMADE and config is not None else {}
    try:
        return key_map(det.family, "official")(sub, **kwargs)  # a family without a key map fails here, naming itself
    except KeyMapError as e:
        raise LoadError(f"cannot convert this {det} checkpoint to the official layout: {e}") from None


def _place_gguf(model: nn.Module, sd: Mapping[str, Tensor], ckpt: Checkpoint) -> dict[str, Tensor] | None:
    """GGUF blocks into the model: each quantised Linear weight stays blocks in a `GGUFLinear` swapped in for the
    Linear; any other quantised tensor is dequantised here. None where the official layout is no plain renaming of
    the file's tensors (their placeholders were combined), so the blocks cannot be placed."""
    of = {id(ckpt[k]): (b, ckpt.quant_types[k]) for k, b in ckpt.quantized.items()}  # placeholder -> its blocks
    out = dict(sd)
    for k, v in sd.items():
        if not v.is_meta:
            continue
        if id(v) not in of:
            return None
        b, qtype = of[id(v)]
        owner, _, leaf = k.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if leaf == "weight" and type(module) in (nn.Linear, CastLinear) and qtype in gguf.BLOCKS and \
                module.in_features % gguf.BLOCKS[qtype][0] == 0 and tuple(v.shape) == tuple(module.weight.shape):
            parent, _, child = owner.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, gguf.GGUFLinear.like(module, qtype))
            out[k] = b
        else:  # embeddings, convs, odd widths: dequantised once
            out[k] = gguf.dequantize(b, qtype, tuple(v.shape))
    return out


def _take_scales(sd: Mapping[str, Tensor], matmul: set[str]) -> tuple[dict[str, Tensor], Mapping[str, Tensor]]:
    """ComfyUI "scaled fp8" files: per-layer `scale_weight` (true weight = fp8 weight * scale), `scale_input`
    (for fp8 matmuls; an upcast matmul needs none) and a `scaled_fp8` marker -> (layer -> scale, the rest)."""
    if "scaled_fp8" not in sd:
        return {}, sd
    n = len(".scale_weight")
    scales = {k[:-n]: v for k, v in sd.items() if k.endswith(".scale_weight") and k[:-n] + ".weight" in matmul}
    drop = {"scaled_fp8"} | {f"{k}.scale_weight" for k in scales} | {k for k in sd if k.endswith(".scale_input")}
    return scales, {k: v for k, v in sd.items() if k not in drop}


def _target_dtype(t: Tensor, is_matmul_weight: bool, dtype: torch.dtype | None,
                  compute_dtype: torch.dtype | None) -> torch.dtype:
    if not t.is_floating_point():
        return t.dtype
    if is_matmul_weight:
        return dtype or t.dtype
    # everything that is no matmul weight (norms, biases, tables) is tiny: keep it in the compute dtype
    wanted = compute_dtype or dtype or t.dtype
    return torch.bfloat16 if wanted.itemsize == 1 else wanted


def load(
    spec: str | Path | dict | Any | None,
    source: str | Path | Mapping[str, Tensor],
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    compute_dtype: str | torch.dtype | None = None,
    ema: bool = False,
    dequantize_gguf: bool = False,
) -> nn.Module | tuple[nn.Module, LoadReport]:
    """Build `spec` (name, YAML, dict, config; None: detect) on meta and assign the checkpoint's tensors.

    `dtype` (fp32/bf16/fp16/fp8 or a torch dtype; None keeps the file's) stores the Linear/Conv weights;
    `compute_dtype` makes those layers upcast for each matmul (default for fp8 weights: bfloat16).
    A GGUF file's quantised Linear weights stay quantised (`layers.gguf.GGUFLinear`, dequantised per matmul into the
    input's dtype or `compute_dtype`; `dtype` does not apply to them); its other quantised tensors, and all of them
    with `dequantize_gguf=True`, are dequantised on load.
    The model comes back in eval mode; `strict=False` returns `(model, report)`, zero-filling what is missing.
    """
    sd = source if isinstance(source, Mapping) else load_file(source, ema=ema, keep_quantized=not dequantize_gguf)
    shard = getattr(sd, "shard", None)
    if shard is not None:
        k, n, index = shard
        raise LoadError(f"{source} is shard {k} of {n} of a sharded checkpoint: load "
                        + (f"its index file {index} (or its folder)" if index else "the *.index.json of the set "
                           "(or its folder)"))
    opened = sd if not isinstance(source, Mapping) else None  # a file we mapped ourselves: its pages may be dropped
    _refuse_bnb(sd)
    dtype = parse_dtype(dtype) if dtype is not None else None
    compute_dtype = parse_dtype(compute_dtype) if compute_dtype is not None else None
    if spec is None:
        det = detect(sd)
        name, config, model, sd = which_config(sd, det)
        if name is None and det.assumed:
            warnings.warn(f"zoo.load: {', '.join(f'{k}={v}' for k, v in det.assumed.items())} assumed (the released "
                          "value; no shape tells it): pass a config if the file differs", stacklevel=2)
    else:
        config = get_config(spec)
        model = build(config, device="meta")
        sd = _official(sd, model.arch, config)
    blocks = getattr(opened, "quantized", None)
    if blocks:
        placed = _place_gguf(model, sd, opened)
        if placed is None:  # a layout conversion fused quantised tensors: dequantise the file on load instead
            return load(spec, load_file(source, ema=ema), dtype=dtype, device=device, strict=strict,
                        compute_dtype=compute_dtype)
        sd = placed

    matmul = {f"{n}.weight".lstrip(".") for n, m in model.named_modules() if type(m) in CAST_OF or isinstance(m, CASTS)}
    scales, sd = _take_scales(sd, matmul)
    stored_fp8 = any(sd[k].dtype.itemsize == 1 and sd[k].is_floating_point() for k in matmul if k in sd)
    if compute_dtype is None and ((dtype is not None and dtype.itemsize == 1) or (dtype is None and stored_fp8)):
        compute_dtype = torch.bfloat16  # fp8 cannot be computed in: upcast per layer, as fp8 Flux files are run
    if scales and compute_dtype is None:  # the scale lives in the cast layers
        compute_dtype = dtype if dtype is not None and dtype.itemsize > 1 else torch.bfloat16
    if compute_dtype is not None:
        cast_layers(model, compute_dtype)
        for m in model.modules():
            if isinstance(m, gguf.GGUFLinear):
                m.compute_dtype = compute_dtype

    expected = model.state_dict()  # meta tensors: names, shapes
    report = LoadReport(
        missing={k: tuple(v.shape) for k, v in expected.items() if k not in sd},
        unexpected={k: tuple(v.shape) for k, v in sd.items() if k not in expected},
        mismatched={k: (tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items()
                    if k in sd and sd[k].shape != v.shape},
    )
    if strict and not report.ok:
        raise LoadError(f"checkpoint does not fit {type(model).__name__} ({_name(spec, config)}): {report}")

    if opened is not None and sd is not opened:
        opened.release()  # a layout conversion read (and copied) fused parts: their file pages are not needed now
    tensors = {}
    for k, want in expected.items():
        if k in sd and k not in report.mismatched:
            t = sd[k]
            tensors[k] = t.to(device=device, dtype=_target_dtype(t, k in matmul, dtype, compute_dtype))
            if opened is not None and tensors[k].data_ptr() != t.data_ptr():
                opened.release(t)  # copied (new dtype or device): keep one copy resident, not two
        else:  # strict=False: a zero tensor, listed in the report, so the model can run once it is filled
            ref = torch.empty(0, dtype=dtype or torch.float32)
            tensors[k] = torch.zeros(want.shape, device=device,
                                     dtype=_target_dtype(ref, k in matmul, dtype, compute_dtype))
    model.load_state_dict(tensors, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left and torch.device(device).type != "meta":
        raise LoadError(f"tensors not in the state dict stayed on meta (non-persistent buffers?): {left[:10]}")
    for name, scale in scales.items():  # scaled fp8: the layer rescales its output (a non-persistent buffer)
        if not isinstance(model.get_submodule(name), CastLinear):
            raise LoadError(f"{name}.scale_weight: scaled weights are supported on Linear layers only")
        model.get_submodule(name).register_buffer("weight_scale", scale.to(device=device, dtype=torch.float32),
                                                  persistent=False)
    model.eval()
    return model if strict else (model, report)


def _name(spec, config) -> str:
    return str(spec) if isinstance(spec, (str, Path)) else type(config).__name__


def inspect_file(path: str | Path) -> str:
    """`python -m zoo inspect`: checkpoints_convert's summary of the file plus the config `zoo.load` builds for it."""
    lines = [line for line in summarize(str(path)).splitlines() if not line.startswith("load: ")]
    sd = load_file(path)
    try:
        det = detect(sd)
        if det.family == "lora":
            return "\n".join(lines)
        shapes = Checkpoint({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()},
                            paths=sd.paths, metadata=sd.metadata)  # keys and shapes only: nothing is read
        name, config, _, _ = which_config(shapes, det)
    except ValueError as e:
        return "\n".join(lines + [f"zoo config: none ({str(e).splitlines()[0]})"])
    if name is not None:
        return "\n".join(lines + [f"zoo config: {name}  ->  zoo.load({name!r}, {str(path)!r})"])
    return "\n".join(lines + [f"zoo config: not a shipped size; read off the shapes: {config}  ->  "
                              f"zoo.load(None, {str(path)!r})"])
