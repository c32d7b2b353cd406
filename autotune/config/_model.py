"""Model shapes: presets, explicit dimensions, or a local Hugging Face ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from autotune.errors import UserError

__all__ = ["MODEL_PRESETS", "ModelDims", "ModelSpec"]


class ModelDims(BaseModel):
    """Resolved dimensions of a Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: PositiveInt
    hidden: PositiveInt
    heads: PositiveInt
    kv_heads: PositiveInt
    ffn: PositiveInt
    vocab: PositiveInt
    head_dim: PositiveInt | None = Field(None, description="defaults to hidden // heads")
    max_seq_len: PositiveInt = 16384
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    qkv_bias: bool = False
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelDims:
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"heads={self.heads} does not divide hidden={self.hidden}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads} does not divide heads={self.heads}")
        if self.dim_head % 2:
            raise ValueError(f"head_dim={self.dim_head} must be even for rotary embeddings")
        return self

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @property
    def q_width(self) -> int:
        return self.heads * self.dim_head

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.dim_head

    def matmul_params_per_layer(self) -> int:
        attn = self.hidden * self.q_width * 2 + self.hidden * self.kv_width * 2
        return attn + 3 * self.hidden * self.ffn

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (all but the embedding lookup)."""
        return self.layers * self.matmul_params_per_layer() + self.vocab * self.hidden

    def total_params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        bias = self.layers * (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0
        embed = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.matmul_params() + embed + norms + bias


# Real shapes from the published configs; llama-tiny is sized so that one step of the
# default workload takes about a second on a 2-core CPU in float32.
MODEL_PRESETS: dict[str, ModelDims] = {
    "llama-tiny": ModelDims(layers=4, hidden=192, heads=6, kv_heads=2, ffn=512, vocab=2048,
                            max_seq_len=16384),
    "llama3-8b": ModelDims(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336,
                           vocab=128256, max_seq_len=131072, rope_theta=500000.0),
    "qwen2.5-7b": ModelDims(layers=28, hidden=3584, heads=28, kv_heads=4, ffn=18944,
                            vocab=152064, max_seq_len=131072, rope_theta=1000000.0,
                            norm_eps=1e-6, qkv_bias=True),
    "llama3-70b": ModelDims(layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672,
                            vocab=128256, max_seq_len=131072, rope_theta=500000.0),
}

_HF_FAMILIES = {"llama", "qwen2", "mistral"}


def _dims_from_hf(path: Path) -> ModelDims:
    if not path.is_file():
        raise UserError(f"model.hf_config: file not found: {path}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"model.hf_config: {path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"model.hf_config: {path} must hold a JSON object")
    family = cfg.get("model_type")
    if family not in _HF_FAMILIES:
        raise UserError(f"model.hf_config: model_type {family!r} in {path} is not one of "
                        f"{sorted(_HF_FAMILIES)}")
    try:
        heads = cfg["num_attention_heads"]
        return ModelDims(
            layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads, ffn=cfg["intermediate_size"],
            vocab=cfg["vocab_size"], head_dim=cfg.get("head_dim"),
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            # transformers 5 writes it inside rope_parameters
            rope_theta=cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get(
                "rope_theta", 10000.0), norm_eps=cfg.get("rms_norm_eps", 1e-5),
            qkv_bias=family == "qwen2", tie_embeddings=cfg.get("tie_word_embeddings", False))
    except KeyError as exc:
        raise UserError(f"model.hf_config: {path} lacks key {exc.args[0]!r}") from None
    except ValueError as exc:
        raise UserError(f"model.hf_config: {path}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        err = errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        return f"{loc}: {err['msg']}" if loc else err["msg"]
    return str(exc).splitlines()[0]


class ModelSpec(BaseModel):
    """What the user writes under ``workload.model``: exactly one of preset, dims or hf_config."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = None
    hf_config: str | None = None
    layers: PositiveInt | None = None
    hidden: PositiveInt | None = None
    heads: PositiveInt | None = None
    kv_heads: PositiveInt | None = None
    ffn: PositiveInt | None = None
    vocab: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    max_seq_len: PositiveInt | None = None
    rope_theta: float | None = Field(None, gt=0)
    qkv_bias: bool | None = None
    tie_embeddings: bool | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        explicit = self._explicit_fields()
        sources = [self.preset is not None, self.hf_config is not None, bool(explicit)]
        if sum(sources) != 1:
            raise ValueError("give exactly one of: preset, hf_config, or explicit dims "
                             "(layers, hidden, heads, kv_heads, ffn, vocab)")
        if self.preset is not None and self.preset not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; "
                             f"choose from {sorted(MODEL_PRESETS)}")
        if explicit:
            missing = [k for k in ("layers", "hidden", "heads", "ffn", "vocab")
                       if getattr(self, k) is None]
            if missing:
                raise ValueError(f"explicit model dims lack {', '.join(missing)}")
            self.resolve()  # surfaces shape errors at load time
        return self

    def _explicit_fields(self) -> dict[str, object]:
        skip = {"preset", "hf_config"}
        return {k: v for k, v in self.__dict__.items() if k not in skip and v is not None}

    def resolve(self, base_dir: Path | None = None) -> ModelDims:
        """The concrete dimensions; ``hf_config`` paths are relative to ``base_dir``."""
        if self.preset is not None:
            return MODEL_PRESETS[self.preset]
        if self.hf_config is not None:
            path = Path(self.hf_config)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            return _dims_from_hf(path)
        fields = self._explicit_fields()
        fields.setdefault("kv_heads", fields["heads"])
        return ModelDims(**fields)

    def label(self) -> str:
        if self.preset is not None:
            return self.preset
        if self.hf_config is not None:
            return Path(self.hf_config).parent.name or "hf-model"
        return f"custom-{self.layers}x{self.hidden}"
