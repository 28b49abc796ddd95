"""The kinds of LoRA file, told apart by their keys: one table for `checkpoints_convert.detect` and `lora`.

A kind's `name` is the LoRA format `lora` reads and writes (`lora.detect`, `lora.convert(to=...)`) and what `detect`
reports as a LoRA's `Detection.layout`: one name per kind. The first kind whose `matches` holds is the file's kind.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

KOHYA_PREFIX = re.compile(r"^lora_(unet|transformer|te\d?)_")  # sd-scripts: lora_unet_{module with _}
XLABS_KEY = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora(\d?)\."
                       r"(down|up)\.weight$")  # x-flux: double_blocks.N.processor.qkv_lora1.down.weight
DOWN_UP = (".lora_down.weight", ".lora_up.weight")
PEFT_AB = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight")  # + diffusers' older names
PROCESSOR = re.compile(r"_lora\.(down|up)\.weight$")  # diffusers' attention-processor LoRAs: to_q_lora.down.weight


@dataclass(frozen=True)
class LoRAKind:
    name: str
    matches: Callable[[list[str]], bool]
    down: tuple[str, ...] = ()  # key endings of the (rank, in) factor: where the ranks are read
    readable: bool = True  # False: recognised, so named in errors, but `lora` cannot read it
    writable: bool = True  # a format `lora` writes (LoHa / LoKr are read and applied only)
    note: str = ""


KINDS: tuple[LoRAKind, ...] = (
    # LyCORIS (kohya-style or official module names, `.alpha` keys); a file may mix them with plain LoRA modules
    LoRAKind("loha", lambda keys: any(k.endswith(".hada_w1_a") for k in keys), (".hada_w1_b",),
             writable=False),
    LoRAKind("lokr", lambda keys: any(k.endswith((".lokr_w1", ".lokr_w1_a")) for k in keys),
             (".lokr_w1_b", ".lokr_w2_b"), writable=False),
    LoRAKind("xlabs", lambda keys: any(XLABS_KEY.match(k) for k in keys), (".down.weight",)),
    LoRAKind("kohya", lambda keys: any(KOHYA_PREFIX.match(k) and k.endswith(DOWN_UP) for k in keys),
             (".lora_down.weight",)),
    LoRAKind("diffusers", lambda keys: any(k.endswith(PEFT_AB) for k in keys),
             (".lora_A.weight", ".lora.down.weight")),
    LoRAKind("comfy", lambda keys: any(k.endswith(DOWN_UP) for k in keys)
             and any(k.startswith("diffusion_model.") for k in keys), (".lora_down.weight",)),
    LoRAKind("ours", lambda keys: any(k.endswith(DOWN_UP) for k in keys), (".lora_down.weight",)),
    LoRAKind("attn-processor", lambda keys: any(PROCESSOR.search(k) for k in keys),
             ("_lora.down.weight",), readable=False,
             note="diffusers' old attention-processor LoRA (to_q_lora.down.weight); load it in diffusers and save "
                  "it again (save_lora_weights) to get a file `lora` reads"),
)
FORMATS = tuple(k.name for k in KINDS if k.readable and k.writable)


def lora_kind(keys: Iterable[str]) -> LoRAKind | None:
    """The kind of LoRA whose keys these are, or None if they are no LoRA's."""
    keys = list(keys)
    return next((k for k in KINDS if k.matches(keys)), None)


def lora_ranks(sd, kind: LoRAKind) -> list[int]:
    """The distinct ranks of a LoRA state dict of `kind` (rows of its down factors)."""
    return sorted({t.shape[0] for k, t in sd.items() if k.endswith(kind.down) and len(t.shape) >= 2})
