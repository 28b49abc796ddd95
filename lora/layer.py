"""LoRA layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation"): W x + sum_a w_a * m_a * (alpha_a / r_a) * B_a A_a x.

Three numbers scale an adapter, each under one name: `alpha_over_rank` (alpha / r, fixed by the file or the
training), the user's `multiplier` m (kohya's word; set when the adapter is added or loaded) and `total_scale`,
their product. `set_adapter`'s weights w come on top, per activation.

Per batch item: `per_item` (a list aligned with the input's batch, see `lora.adapters_per_item`) runs item i with
adapter `per_item[i]` alone at weight 1 (None: the base alone) in the same forward, as peft's mixed-adapter batches
(`adapter_names=`) and OmniX's cross-LoRA, where a condition item and a target item take different adapters. An
input whose batch and token dims were flattened (B * L rows, as Flux's single blocks feed `linear2`) is cut into
len(per_item) equal consecutive parts, one per item.

A `LoRALinear` / `LoRAConv2d` wraps an existing `nn.Linear` / `nn.Conv2d` and *shares* its parameters: the
wrapper registers the base's own `weight` and `bias` objects under the same names, so the model's state-dict
keys of the base do not change (`...qkv.weight` stays `...qkv.weight`); the adapters add
`lora_down.<adapter>.weight` (A, rank x in) and `lora_up.<adapter>.weight` (B, out x rank) beside them.
A conv adapter is kohya's: A is a conv with the base's kernel, stride and padding, B a 1x1 conv.
An adapter may be DoRA (Liu et al. 2024): a magnitude m per output row `lora_magnitude.<adapter>` (out,) makes the
weight m * (W + s B A) / ||W + s B A||_row, as peft's `use_dora` (the norm is detached, as there). A LoHa / LoKr
adapter (`lora.lycoris`) is a `lycoris.<adapter>` module giving its weight delta instead of B A.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora.lycoris import Lycoris, LycorisDelta

FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
INITS = ("zeros", "gaussian", "none")


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of a base layer's adapters: its compute dtype (`layers.cast`), else its weight's (fp8: bf16)."""
    if getattr(base, "compute_dtype", None) is not None:
        return base.compute_dtype
    return torch.bfloat16 if base.weight.dtype in FP8 else base.weight.dtype


class LoRALayer(nn.Module):
    """Named adapters around a shared base layer; subclasses give the base forward and the factor shapes."""

    def __init__(self, base: nn.Module):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: its parameters are registered below, same names
        self.weight = base.weight
        self.bias = base.bias
        self.lora_down = nn.ModuleDict()
        self.lora_up = nn.ModuleDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters: m (out,)
        self.lycoris = nn.ModuleDict()  # LoHa / LoKr adapters
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.multiplier: dict[str, float] = {}  # the user's multiplier per adapter (kohya's `multiplier`)
        self.active: dict[str, float] = {}  # adapter -> weight; empty = base only
        self.merged: dict[str, float] = {}  # adapters (and weights) folded into `weight`
        self.per_item: list[str | None] | None = None  # adapter per batch item; None: `active` for every item
        self._unmerged_weight: Tensor | None = None  # exact copy of the base weight while merged

    # ---- subclass hooks ----
    def _base_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _factors(self, rank: int, dtype: torch.dtype, device) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def _base_forward_nobias(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    # ---- adapters ----
    def add_adapter(self, name: str, rank: int, alpha: float | None = None, *, multiplier: float = 1.0,
                    init: str = "zeros", dtype: torch.dtype | None = None) -> None:
        """Add adapter `name` of `rank` (alpha defaults to rank: alpha / rank 1); it becomes the one active adapter."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; remove it first")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if self.merged:
            raise ValueError("cannot add an adapter to a merged layer; unmerge first")
        down, up = self._factors(rank, dtype or adapter_dtype(self.base), self.weight.device)
        if init != "none" and not down.weight.is_meta:
            with torch.no_grad():
                if init == "zeros":  # the paper's: A random, B zero, so the adapter starts as the identity
                    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(down.weight, std=1 / rank)
                nn.init.zeros_(up.weight)
        self.lora_down[name], self.lora_up[name] = down, up
        self.rank[name] = rank
        self.alpha[name] = float(rank if alpha is None else alpha)
        self.multiplier[name] = float(multiplier)
        self.active = {name: 1.0}

    @torch.no_grad()
    def set_magnitude(self, name: str, magnitude: Tensor) -> None:
        """Make LoRA adapter `name` a DoRA one with magnitude m: one entry per output row of the weight."""
        out = self.weight.shape[0]
        if name not in self.lora_down:
            raise ValueError(f"DoRA needs a LoRA adapter {name!r}; this layer has LoRA adapters {list(self.lora_down)}")
        if magnitude.numel() != out:
            raise ValueError(f"DoRA magnitude of adapter {name!r} has shape {tuple(magnitude.shape)}; the weight "
                             f"{tuple(self.weight.shape)} needs one entry per output row ({out})")
        dtype = self.lora_down[name].weight.dtype
        self.lora_magnitude[name] = nn.Parameter(magnitude.detach().reshape(out).to(self.weight.device, dtype).clone())

    def add_lycoris(self, name: str, adapter: Lycoris, *, multiplier: float = 1.0, dtype: torch.dtype | None = None):
        """Add a LoHa / LoKr adapter `name` (its tensors copied); it becomes the one active adapter."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; remove it first")
        if self.merged:
            raise ValueError("cannot add an adapter to a merged layer; unmerge first")
        self.lycoris[name] = LycorisDelta(adapter.kind, adapter.tensors, self.delta_shape(),
                                          dtype or adapter_dtype(self.base), self.weight.device)
        self.rank[name] = adapter.rank or 1
        self.alpha[name] = adapter.alpha_over_rank * self.rank[name]
        self.multiplier[name] = float(multiplier)
        self.active = {name: 1.0}

    def delete_adapter(self, name: str) -> None:
        if self.merged:
            raise ValueError("cannot delete an adapter of a merged layer; unmerge first")
        for d in (self.lora_down, self.lora_up, self.lora_magnitude, self.lycoris):
            if name in d:
                del d[name]
        for d in (self.rank, self.alpha, self.multiplier, self.active):
            d.pop(name, None)

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_down.keys()) + list(self.lycoris.keys())

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """The parameters of adapter `name` by their names under this layer (A, B, a DoRA magnitude, LyCORIS')."""
        if name in self.lycoris:
            return {f"lycoris.{name}.{k}": p for k, p in self.lycoris[name].named_parameters()}
        out = {f"lora_down.{name}.weight": self.lora_down[name].weight,
               f"lora_up.{name}.weight": self.lora_up[name].weight}
        if name in self.lora_magnitude:
            out[f"lora_magnitude.{name}"] = self.lora_magnitude[name]
        return out

    def alpha_over_rank(self, name: str) -> float:
        return self.alpha[name] / self.rank[name]

    def total_scale(self, name: str) -> float:
        """alpha / rank times the user's multiplier: what B A x is multiplied by (before set_adapter's weight)."""
        return self.alpha_over_rank(name) * self.multiplier[name]

    def set_active(self, weights: dict[str, float]) -> None:
        unknown = [n for n in weights if n not in self.adapters]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {self.adapters}")
        if self.merged and dict(weights) != self.merged:
            raise ValueError(f"layer is merged with {self.merged}; unmerge before switching adapters")
        self.active = dict(weights)

    def set_per_item(self, names: list[str | None] | None) -> None:
        """Item i of each input batch runs with adapter names[i] alone (None: base only); `None` ends it."""
        if names is not None:
            names = list(names)
            unknown = [n for n in names if n is not None and n not in self.adapters]
            if unknown:
                raise ValueError(f"unknown adapter(s) {unknown}; this layer has {self.adapters}")
            if self.merged:
                raise ValueError(f"layer is merged with {self.merged}; unmerge before running adapters per item")
        self.per_item = names

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(down, up) = (A, B) of adapter `name`, detached: A (r, in[, kh, kw]), B (out, r[, 1, 1])."""
        if name in self.lycoris:
            raise ValueError(f"adapter {name!r} is a {self.lycoris[name].kind} adapter, which has no (down, up) "
                             "factors")
        if name not in self.lora_down:
            raise ValueError(f"unknown adapter {name!r}; this layer has {self.adapters}")
        return self.lora_down[name].weight.detach(), self.lora_up[name].weight.detach()

    @torch.no_grad()
    def set_factors(self, name: str, down: Tensor, up: Tensor) -> None:
        """Copy A (`down`) and B (`up`) into adapter `name`, cast to its dtype; shapes must be the adapter's."""
        if self.merged:
            raise ValueError("cannot set the factors of a merged layer; unmerge first")
        have = self.factors(name)
        for role, t, want in (("down", down, have[0]), ("up", up, have[1])):
            if tuple(t.shape) != tuple(want.shape):
                raise ValueError(f"adapter {name!r}: {role} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
        self.lora_down[name].weight.copy_(down)
        self.lora_up[name].weight.copy_(up)

    def delta(self, name: str) -> Tensor:
        """B A of adapter `name` in fp32, shaped like the base weight (without any scale); LoHa / LoKr: their dW."""
        if name in self.lycoris:
            return self.lycoris[name].delta()
        a = self.lora_down[name].weight.float().flatten(1)  # (r, in * kh * kw)
        b = self.lora_up[name].weight.float().flatten(1)  # (out, r)
        return (b @ a).reshape(self.delta_shape())

    # ---- forward ----
    def forward(self, x: Tensor) -> Tensor:
        base = self.base
        if base.weight is not self.weight or base.bias is not self.bias:  # load_state_dict(assign=True) swapped ours
            base.weight, base.bias = self.weight, self.bias
        if self.weight.dtype in FP8 and not hasattr(base, "compute_dtype"):  # plain layer, fp8 storage: upcast
            out = self._base_forward(x, self.weight.to(x.dtype))
        else:  # the base's own forward (a `layers.cast` layer computes in its compute_dtype)
            out = base(x)
        if self.per_item is None:
            return self._add_adapters(x, out, self.active)
        n = x.shape[0] // len(self.per_item)  # rows per item: 1, or L when a block flattened (B, L) to B*L rows
        if n * len(self.per_item) != x.shape[0] or n == 0:
            raise ValueError(f"input batch {x.shape[0]} is not a multiple of the {len(self.per_item)} per-item "
                             f"adapters {self.per_item}")
        # consecutive items with the same adapter form one slice (OmniX's [rgb, task] * B: two slices per panorama)
        parts, start = [], 0
        for stop in range(1, len(self.per_item) + 1):
            if stop == len(self.per_item) or self.per_item[stop] != self.per_item[start]:
                name, rows = self.per_item[start], slice(start * n, stop * n)
                parts.append(self._add_adapters(x[rows], out[rows], {} if name is None else {name: 1.0}))
                start = stop
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _add_adapters(self, x: Tensor, out: Tensor, active: dict[str, float]) -> Tensor:
        """The base output `out` of input `x` plus the adapters in `active` (name -> weight)."""
        for name, weight in active.items():
            if name in self.merged or weight == 0:
                continue
            s = self.total_scale(name) * weight
            if name in self.lycoris:
                dw = self.lycoris[name].delta().to(self.lycoris[name].dtype_of())
                h = self._base_forward_nobias(x.to(dw.dtype), dw)
                out = torch.add(out, h.to(out.dtype), alpha=s)
                continue
            down, up = self.lora_down[name], self.lora_up[name]
            h = up(down(x.to(down.weight.dtype)))
            if name in self.lora_magnitude:  # DoRA: g (W x + s B A x) - W x, with W x the base's output less bias
                g = self._per_row(self._dora_gain(name, s), out)
                wx = out if self.bias is None else out - self._per_row(self.bias, out)
                out = out + ((g - 1) * wx + g * s * h).to(out.dtype)
                continue
            out = torch.add(out, h.to(out.dtype), alpha=s)  # the scale fused into the add
        return out

    def _dora_gain(self, name: str, s: float) -> Tensor:
        """m / ||W + s B A|| per output row (detached, fp32), the DoRA rescaling."""
        w = self.weight.detach().float() + s * self.delta(name).detach()
        return self.lora_magnitude[name].float() / w.flatten(1).norm(dim=1)

    def _per_row(self, t: Tensor, out: Tensor) -> Tensor:
        """A per-output-row vector (out,) broadcast against an output: last dim (linear) or dim 1 (conv)."""
        return t.to(out.dtype) if isinstance(self, LoRALinear) else t.to(out.dtype).view(-1, 1, 1)

    # ---- merge ----
    @torch.no_grad()
    def merge(self, *, permanent: bool = False) -> None:
        """Fold the active adapters into the base weight; the original is kept so `unmerge` is bit-exact, unless
        `permanent` (then the merged weight becomes the base and no adapter counts as merged)."""
        if self.per_item is not None:
            raise ValueError(f"cannot merge while adapters run per batch item ({self.per_item}); leave "
                             "lora.adapters_per_item first")
        if not self.merged and self.active:
            self._merge_active()
        if permanent:
            self._unmerged_weight, self.merged = None, {}

    def _merge_active(self) -> None:
        if self.weight.dtype in FP8:
            raise ValueError("merging into an fp8-stored weight would lose the adapter; keep it unmerged")
        self._unmerged_weight = self.weight.detach().clone()
        w0 = self.weight.float()
        total = w0
        for name, weight in self.active.items():
            s = self.total_scale(name) * weight
            if name in self.lora_magnitude:  # DoRA: g (W + s B A) - W
                g = self._dora_gain(name, s).view(-1, *[1] * (w0.ndim - 1))
                total = total + (g - 1) * w0 + g * s * self.delta(name)
            else:
                total = total + self.delta(name) * s
        self.weight.copy_(total.to(self.weight.dtype))
        self.merged = dict(self.active)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight, self.merged = None, {}

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}(r={self.rank[n]}, alpha={self.alpha[n]:g})" for n in self.adapters)
        return f"{self.base.__class__.__name__}{tuple(self.weight.shape)}, adapters=[{ads}], active={self.active}"


class LoRALinear(LoRALayer):
    """LoRA around an `nn.Linear`: A (r, in), B (out, r)."""

    def __init__(self, base: nn.Linear):
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        super().__init__(base)
        self.in_features, self.out_features = base.in_features, base.out_features

    def _base_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, None if self.bias is None else self.bias.to(weight.dtype))

    def _base_forward_nobias(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def _factors(self, rank, dtype, device):
        kw = dict(bias=False, dtype=dtype, device=device)
        return nn.Linear(self.in_features, rank, **kw), nn.Linear(rank, self.out_features, **kw)


class LoRAConv2d(LoRALayer):
    """LoRA around an `nn.Conv2d` (kohya's LoCon): A a conv with the base's kernel/stride/padding, B a 1x1 conv."""

    def __init__(self, base: nn.Conv2d):
        if not isinstance(base, nn.Conv2d):
            raise ValueError(f"LoRAConv2d wraps an nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1:
            raise ValueError(f"LoRAConv2d needs groups=1, this conv has groups={base.groups}")
        super().__init__(base)

    def _base_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.base._conv_forward(x, weight, None if self.bias is None else self.bias.to(weight.dtype))

    def _base_forward_nobias(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.base._conv_forward(x, weight, None)

    def _factors(self, rank, dtype, device):
        b = self.base
        down = nn.Conv2d(b.in_channels, rank, b.kernel_size, b.stride, b.padding, b.dilation, bias=False,
                         padding_mode=b.padding_mode, dtype=dtype, device=device)
        return down, nn.Conv2d(rank, b.out_channels, 1, bias=False, dtype=dtype, device=device)


def wrap(module: nn.Module) -> LoRALayer:
    """The LoRA wrapper for `module` (itself if already wrapped)."""
    if isinstance(module, LoRALayer):
        return module
    if isinstance(module, nn.Linear):
        return LoRALinear(module)
    if isinstance(module, nn.Conv2d):
        return LoRAConv2d(module)
    raise ValueError(f"LoRA supports nn.Linear and nn.Conv2d, got {type(module).__name__}")
