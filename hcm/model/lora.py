"""LoRA (Hu et al. 2021, arXiv 2106.09685) adapters on InternVL3, with `peft`, in place.

`add_adapters` puts a rank-r adapter W + (alpha/r) B A beside the linear layers of each
component `module.freeze` leaves trainable (the language model's `target_modules`; every linear
layer of the vision tower and of the projector), freezes every base weight in the dtype it was
loaded in, and holds the adapters in fp32: they are what trains. B starts at zero, so the adapted
model computes what the base computes until the first step. The model stays an
`InternVLForConditionalGeneration` (peft's layers replace its linear layers in place, as
`peft.inject_adapter_in_model` does), so generation, log-probs and the vision cache see no
difference.

`adapters_off` gives the base model back for a while (GRPO's reference, eq. 4: the stage's
initial model); `merge_adapters` folds the adapters into their base weights, in fp32, for the
exported `save_pretrained` model; `adapter_state` and `save_adapter` are the adapters alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from peft.functional import cast_adapter_dtype, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

ADAPTER = "default"  # peft's name for the one adapter

# The Qwen2 decoder's linear layers (InternVL3's language model); lm_head is left out: its
# weight may be tied to the embeddings, which a merge would change too.
LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_names(model: nn.Module, target_modules: Sequence[str], freeze: dict) -> list[str]:
    """The full names of the linear layers to adapt: in each component `freeze` leaves trainable
    (False = trained), the language model's `target_modules`, every linear layer of the others."""
    components = {  # (path, leaf names to adapt; None: every linear layer)
        "vision_tower": ("model.vision_tower", None),
        "projector": ("model.multi_modal_projector", None),
        "language_model": ("model.language_model", set(target_modules)),
    }
    names = []
    for component, (path, leaves) in components.items():
        if freeze[component]:
            continue
        for name, layer in model.get_submodule(path).named_modules():
            leaf = name.rpartition(".")[2]
            if isinstance(layer, nn.Linear) and (leaves is None or leaf in leaves):
                names.append(f"{path}.{name}")
    return names


def add_adapters(
    model: nn.Module,
    freeze: dict,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str],
) -> nn.Module:
    """LoRA adapters on `model` (in place; returns it): the keys of `module.lora` (the `lora`
    config group) and the stage's `module.freeze`."""
    names = target_names(model, target_modules, freeze)
    if not names:
        raise ValueError(
            "config key 'module.lora': module.freeze freezes every component, no layer to adapt"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, ADAPTER)  # base weights frozen, adapters trainable
    cast_adapter_dtype(model, ADAPTER)  # peft makes them in the base's dtype: bf16 to fp32
    return model


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter weight (peft names them `<layer>.lora_A...`)."""
    return ".lora_" in key


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """The layers peft put adapters on."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """The base model: every adapter disabled inside the block (peft's `disable_adapter`)."""
    layers = tuner_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapters_disabled(model: nn.Module) -> bool:
    """Whether `model` carries adapters and every one is off (inside `adapters_off`)."""
    layers = tuner_layers(model)
    return bool(layers) and all(layer.disable_adapters for layer in layers)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight and put the plain linear layers back, in place:
    a model `save_pretrained` writes as InternVL3. Weights go to fp32 first, as a fully
    fine-tuned stage exports them: a small adapter update would round away in bf16."""
    model.float()
    for name, layer in list(model.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.get_base_layer())
    del model.peft_config  # what inject_adapter_in_model hung on it: a plain model now
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, named as a `peft.PeftModel` of the base model saves them."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, folder: Path) -> Path:
    """The adapters alone, as `PeftModel.save_pretrained` writes them (adapter_config.json,
    adapter_model.safetensors): `PeftModel.from_pretrained(base, folder)` loads them."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), folder / "adapter_model.safetensors")
    model.peft_config[ADAPTER].save_pretrained(folder)
    return folder
