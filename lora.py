"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on our Transformer, through Hugging Face `peft`.

Our parameter names are LlamaForCausalLM's, so peft's LoRA layers attach to `q_proj` ... `down_proj` exactly
as they would on a Hugging Face Llama, and the adapter files written here (`adapter_model.safetensors` +
`adapter_config.json`, peft's own format and key names) load with `PeftModel.from_pretrained` onto the
exported model. We inject in place (`peft.inject_adapter_in_model`) instead of wrapping in a `PeftModel`,
so the training loop, `generate` and `save_pretrained` keep seeing our own `Transformer`.

    add_lora(model, LoraSettings(rank=16, alpha=32, targets=("q", "v")))   # freezes everything else
    save_adapter(model, settings, "out/sft/medical_dialogue/adapter")
    merged = merge_lora(model)                                            # plain Transformer again
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

# short names (CLI, TOML) -> module names of the HF Llama layout; MoE experts use Mixtral's w1 (gate), w3 (up)
# and w2 (down), so the feed-forward targets reach dense FFNs, shared experts and routed experts alike
TARGETS = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],
           "gate": ["gate_proj", "w1"], "up": ["up_proj", "w3"], "down": ["down_proj", "w2"]}
MODULE_TO_TARGET = {m: t for t, ms in TARGETS.items() for m in ms}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."   # what PeftModel.save_pretrained puts in front of every key


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0                 # the update is scaled by alpha / rank
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        self.targets = [MODULE_TO_TARGET.get(t, t) for t in self.targets]   # accept "q_proj" as well as "q"
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {sorted(TARGETS)}; got {self.targets}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def module_names(self) -> list[str]:
        return sorted({m for t in self.targets for m in TARGETS[t]})

    def peft_config(self, base: str = "") -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.module_names(), bias="none", base_model_name_or_path=base or None)


def add_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Inject LoRA layers in place; afterwards only the adapter parameters require grad."""
    if has_lora(model):
        raise ValueError("model already has LoRA layers; merge them first")
    inject_adapter_in_model(settings.peft_config(), model)
    for name, p in model.named_parameters():   # peft freezes the base already; make it explicit and checkable
        p.requires_grad_("lora_" in name)
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone, under the key names peft writes (`base_model.model.<our name>.lora_A.weight`)."""
    state = get_peft_model_state_dict(model)
    return {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_adapter(model: torch.nn.Module, settings: LoraSettings, out_dir, base: str = "") -> Path:
    """Write adapter_model.safetensors + adapter_config.json (peft's format), atomically per file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (ADAPTER_WEIGHTS + ".tmp")
    save_file(adapter_state_dict(model), str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / ADAPTER_WEIGHTS)
    config = settings.peft_config(base).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    tmp = out_dir / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, default=str, ensure_ascii=False))
    tmp.replace(out_dir / ADAPTER_CONFIG)
    return out_dir


def read_settings(adapter_dir) -> LoraSettings:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a LoRA adapter directory")
    config = json.loads(path.read_text())
    if "our_settings" in config:
        return LoraSettings(**config["our_settings"])
    # an adapter written by peft itself: its module names map back to our short names
    return LoraSettings(rank=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                        targets=sorted({MODULE_TO_TARGET.get(m, m) for m in config["target_modules"]}))


def load_adapter(model: torch.nn.Module, adapter_dir) -> torch.nn.Module:
    """Inject the adapter saved in `adapter_dir` into `model` (in place) and load its weights."""
    settings = read_settings(adapter_dir)
    add_lora(model, settings)
    state = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"adapter {adapter_dir} does not fit the model: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {missing[:5]}")
    return model


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA update into its base weight (W += B A * alpha/r) and put the plain Linear back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
