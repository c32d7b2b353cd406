"""Hugging Face export of the trainer's weights: ``model.safetensors`` and ``config.json``
that ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` where q, k and v have biases) loads as is.

No q/k rows are permuted: ``kernels.elementwise.apply_rope`` rotates halves as HF's
``rotate_half`` does (tests/train/test_hf_export.py compares the logits).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from autotune.config import ModelDims, ModelSpec
from autotune.errors import UserError

__all__ = ["write_hf"]

_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_QKV = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj"}


def _names(dims: ModelDims) -> dict[str, str]:
    """Trainer name -> HF name, for every tensor these dims have."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    kinds = ("weight", "bias") if dims.qkv_bias else ("weight",)
    for i in range(dims.layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        names.update({ours + k: theirs + v for k, v in _LAYER.items()})
        for w, proj in _QKV.items():
            names.update({f"{ours}attention.{w}.{k}": f"{theirs}self_attn.{proj}.{k}"
                          for k in kinds})
    return names


def _config(dims: ModelDims, hf_config: Path | None) -> dict:
    if hf_config is not None:
        # The user's file travels with the weights, so it must describe these weights.
        if ModelSpec(hf_config=str(hf_config)).resolve() != dims:
            raise UserError(f"hf export: {hf_config} does not describe the model's dimensions")
        cfg = json.loads(hf_config.read_text(encoding="utf-8"))
        cfg["torch_dtype"] = "float32"
        if "dtype" in cfg:  # transformers 5 writes this name and prefers it
            cfg["dtype"] = "float32"
        return cfg
    qwen = dims.qkv_bias  # Llama's attention_bias would also give o_proj a bias
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "hidden_size": dims.hidden, "intermediate_size": dims.ffn,
        "num_attention_heads": dims.heads, "num_key_value_heads": dims.kv_heads,
        "num_hidden_layers": dims.layers, "vocab_size": dims.vocab, "head_dim": dims.dim_head,
        "max_position_embeddings": dims.max_seq_len, "rope_theta": dims.rope_theta,
        "rms_norm_eps": dims.norm_eps, "tie_word_embeddings": dims.tie_embeddings,
        "hidden_act": "silu", "mlp_bias": False, "torch_dtype": "float32",
    }
    if not qwen:
        cfg["attention_bias"] = False
    return cfg


def write_hf(state: dict[str, torch.Tensor], dims: ModelDims, out: Path, *,
             hf_config: Path | None = None) -> list[Path]:
    """Write ``state`` (whole, on the CPU, the trainer's names) to the new folder ``out``
    as float32; ``hf_config``, the file the model's dims came from, is kept with its own
    fields. Returns the files written."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"hf export: {out} exists and is not an empty folder")
    names = _names(dims)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        key = key.removeprefix("decoder.")
        if key not in names:
            raise UserError(f"hf export: unexpected tensor {key!r} for a {dims.layers}-layer "
                            f"model{' with qkv bias' if dims.qkv_bias else ''}")
        # Tied models may list the shared head; HF rebuilds it from embed_tokens.
        if not (dims.tie_embeddings and key == "output.weight"):
            # Own, contiguous storage: safetensors refuses views and shared memory.
            tensors[names[key]] = t.detach().to("cpu", torch.float32, copy=True).contiguous()
    missing = [k for k, v in names.items() if v not in tensors
               and not (dims.tie_embeddings and k == "output.weight")]
    if missing:
        raise UserError(f"hf export: the state lacks {missing[0]!r}"
                        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    config = _config(dims, hf_config)

    # Written beside ``out`` and renamed into place, so that an interrupted export leaves
    # no folder that looks complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the export's
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tmp.replace(out)  # rename(2) also takes the place of an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / "model.safetensors", out / "config.json"]
