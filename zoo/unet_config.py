"""The UNet's config (the official LDM/SGM `UNetModel` keyword arguments) and the injection points it implies."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple


class InjectionPoint(NamedTuple):
    """Where a hint can be added: `input_blocks.N` (index N) or `middle_block` (index -1)."""

    name: str
    index: int
    channels: int
    stride: int  # relative to the latent


@dataclass
class UNetConfig:
    """`openaimodel.UNetModel` arguments; ints-or-lists are normalised to per-level lists after validation."""

    in_channels: int
    model_channels: int
    num_res_blocks: int | list[int]
    attention_resolutions: list[int]  # downsampling factors (1, 2, 4, ...) whose blocks get a SpatialTransformer
    out_channels: int | None = None  # None: same as in_channels (required by UNetModel; a ControlNet has none)
    dropout: float = 0.0
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | str | None = None  # int (class ids), "sequential" (SDXL vector y), "continuous"
    num_heads: int = -1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_spatial_transformer: bool = True  # the official default is False (legacy ADM attention, not supported)
    transformer_depth: int | list[int] = 1
    transformer_depth_middle: int | None = None  # None: transformer_depth[-1], as SGM
    context_dim: int | list[int] | None = None  # one width for every cross-attention (SGM's list: per depth)
    # diffusers' `UNet2DConditionModel(cross_attention_dim=[...])`, one per level (the middle block uses the last),
    # as LBM's official constructor gives it: [320, 640, 1280] = each level's width, called without context so that
    # every attn2 attends to the image itself
    cross_attention_dim: list[int] | None = None
    disable_self_attentions: list[bool] | None = None
    num_attention_blocks: list[int] | None = None
    disable_middle_self_attn: bool = False
    disable_middle_transformer: bool = False
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    parameterization: str = "eps"  # what the network predicts (the LDM config's name): eps | v | x0

    IGNORED_FIELDS: ClassVar[frozenset] = frozenset({
        "image_size", "use_checkpoint", "use_fp16", "use_bf16", "num_heads_upsample", "use_new_attention_order",
        "legacy", "spatial_transformer_attn_type", "use_fairscale_checkpoint", "offload_to_cpu",
    })

    def __post_init__(self):
        name = type(self).__name__
        levels = len(self.channel_mult)
        if levels < 1 or self.model_channels < 1 or self.in_channels < 1:
            raise ValueError(f"{name}: channel_mult, model_channels and in_channels must be non-empty/positive")
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.dims != 2:
            raise ValueError(f"{name}.dims={self.dims}: only 2-D UNets are supported")
        if not self.use_spatial_transformer:
            raise ValueError(f"{name}.use_spatial_transformer=False (ADM AttentionBlock UNets) is not supported")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError(f"{name}: set num_heads or num_head_channels (both are -1)")
        self.channel_mult = list(self.channel_mult)
        self.attention_resolutions = list(self.attention_resolutions)
        self.num_res_blocks = self._per_level("num_res_blocks", levels)
        self.transformer_depth = self._per_level("transformer_depth", levels)
        if self.transformer_depth_middle is None:
            self.transformer_depth_middle = self.transformer_depth[-1]
        for lst in ("disable_self_attentions", "num_attention_blocks"):
            v = getattr(self, lst)
            if v is not None and len(v) != levels:
                raise ValueError(f"{name}.{lst} has {len(v)} entries, expected one per level ({levels})")
        if isinstance(self.context_dim, (list, tuple)):
            if len(set(self.context_dim)) != 1:
                raise ValueError(f"{name}.context_dim {list(self.context_dim)}: per-block widths must all be equal "
                                 "(this UNet takes one context tensor); for one width per level use "
                                 "cross_attention_dim")
            self.context_dim = int(self.context_dim[0])
        self._check_cross_attention_dim(levels)
        attends = {lv % levels for lv in self.attention_levels()}  # the middle block (-1) is the last level's width
        if self.context_dim is None and self.cross_attention_dim is None and attends:
            raise ValueError(f"{name}: its SpatialTransformers (attention_resolutions {self.attention_resolutions} "
                             "and the middle block) need a context_dim (or cross_attention_dim, one per level), as "
                             "the official code requires")
        for level, mult in enumerate(self.channel_mult):
            ch = mult * self.model_channels
            if ch % 32:
                raise ValueError(f"{name}: level width model_channels * {mult} = {ch} is not a multiple of 32 "
                                 "(GroupNorm has 32 groups)")
            if level not in attends:  # heads are only computed where a SpatialTransformer is, as the official code
                continue
            if self.num_head_channels != -1 and ch % self.num_head_channels:
                raise ValueError(f"{name}: level width {ch} is not divisible by num_head_channels "
                                 f"{self.num_head_channels}")
            if self.num_head_channels == -1 and ch % self.num_heads:
                raise ValueError(f"{name}: level width {ch} is not divisible by num_heads {self.num_heads}")
        if isinstance(self.num_classes, str) and self.num_classes not in ("sequential", "continuous"):
            raise ValueError(f"{name}.num_classes={self.num_classes!r}: expected an int, 'sequential' or 'continuous'")
        if self.num_classes == "sequential" and not self.adm_in_channels:
            raise ValueError(f"{name}: num_classes='sequential' needs adm_in_channels (the width of y)")
        if self.parameterization not in ("eps", "v", "x0"):
            raise ValueError(f"{name}.parameterization={self.parameterization!r}: expected 'eps', 'v' or 'x0'")

    def _check_cross_attention_dim(self, levels: int) -> None:
        name, v = type(self).__name__, self.cross_attention_dim
        if v is None:
            return
        if self.context_dim is not None:
            raise ValueError(f"{name}: give context_dim ({self.context_dim}, one shared width) or cross_attention_dim "
                             f"({v}, one per level), not both")
        if not isinstance(v, (list, tuple)) or len(v) != levels:
            raise ValueError(f"{name}.cross_attention_dim {v!r}: expected a list with one width per level of "
                             f"channel_mult ({levels}); for one shared width use context_dim")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v):
            raise ValueError(f"{name}.cross_attention_dim {list(v)}: every entry must be a positive int")
        self.cross_attention_dim = list(v)

    def level_context_dim(self, level: int) -> int | None:
        """The context width of the cross-attentions at `level` (-1: the middle block, which uses the last)."""
        if self.cross_attention_dim is not None:
            return self.cross_attention_dim[level]
        return self.context_dim

    def attention_levels(self) -> list[int]:
        """The levels that hold SpatialTransformers (-1 for the middle block)."""
        levels = [lv for lv in range(len(self.channel_mult))
                  if any(self.has_attention(lv, 2**lv, nr) for nr in range(self.num_res_blocks[lv] + 1))]
        return levels + ([] if self.disable_middle_transformer else [-1])

    @property
    def self_context(self) -> bool:
        """Whether every cross-attention's context width equals its level's width, so `context=None` is allowed
        (attn2 then attends to the image itself, as diffusers does without encoder_hidden_states: LBM)."""
        return all(self.level_context_dim(lv) == self.model_channels * self.channel_mult[lv]
                   for lv in self.attention_levels())

    @property
    def context_width(self) -> int | None:
        """The width a context tensor must have: context_dim, or cross_attention_dim's entries where they agree
        (None: no context can be passed)."""
        if self.cross_attention_dim is None:
            return self.context_dim
        dims = {self.cross_attention_dim[lv] for lv in self.attention_levels()}
        return dims.pop() if len(dims) == 1 else None

    def _per_level(self, field_name: str, levels: int) -> list[int]:
        v = getattr(self, field_name)
        if isinstance(v, int):
            return [v] * levels
        if len(v) != levels:
            raise ValueError(f"{type(self).__name__}.{field_name} {list(v)} has {len(v)} entries, expected an int "
                             f"or one per level of channel_mult ({levels})")
        return [int(n) for n in v]

    @property
    def total_stride(self) -> int:
        """Latent size / deepest feature size: 2 ** (number of downsamplings)."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads(self, ch: int) -> tuple[int, int]:
        """(heads, head dim) of a SpatialTransformer of width `ch`."""
        if self.num_head_channels == -1:
            return self.num_heads, ch // self.num_heads
        return ch // self.num_head_channels, self.num_head_channels

    def has_attention(self, level: int, ds: int, nr: int) -> bool:
        """Whether the `nr`-th block of `level` (at downsampling `ds`) has a SpatialTransformer."""
        if ds not in self.attention_resolutions:
            return False
        return self.num_attention_blocks is None or nr < self.num_attention_blocks[level]

    def self_attn_off(self, level: int) -> bool:
        return bool(self.disable_self_attentions[level]) if self.disable_self_attentions is not None else False


def injection_points(cfg: UNetConfig) -> list[InjectionPoint]:
    """Every input block's output (name, index, channels, stride), then the middle block's, from the config alone."""
    points = [InjectionPoint("input_blocks.0", 0, cfg.model_channels, 1)]
    ch, stride = cfg.model_channels, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks[level]):
            ch = mult * cfg.model_channels
            points.append(InjectionPoint(f"input_blocks.{len(points)}", len(points), ch, stride))
        if level != len(cfg.channel_mult) - 1:
            stride *= 2
            points.append(InjectionPoint(f"input_blocks.{len(points)}", len(points), ch, stride))
    points.append(InjectionPoint("middle_block", -1, ch, stride))
    return points
