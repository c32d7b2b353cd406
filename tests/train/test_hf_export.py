"""The Hugging Face export loads in transformers' own model classes and gives our logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autotune.config import MODEL_PRESETS, ModelDims, ModelSpec
from autotune.errors import UserError
from autotune.train.hf_export import write_hf
from autotune.train.model import Decoder
from kernels.attention import Segments

transformers = pytest.importorskip("transformers")

# Qwen2-style: q/k/v biases, tied embeddings, and head_dim apart from hidden // heads.
QWEN = ModelDims(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=300, head_dim=24,
                 max_seq_len=128, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
                 tie_embeddings=True)
LENGTHS = (7, 33, 64)


def _model(dims: ModelDims) -> Decoder:
    """Fresh weights moved off their init, so that all-ones norms and zero biases cannot
    hide a name mapped to the wrong tensor."""
    model = Decoder(dims, seed=0).float().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim == 1 else 0.05))
    return model


def _ours(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[0]
    with torch.no_grad():
        h, _ = model.run_layers(model.tok_embeddings(ids), torch.arange(n), Segments((0, n)))
        return model.output(model.norm(h))


def _check_logits(model: Decoder, path: Path) -> float:
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    hf.eval()
    gen = torch.Generator().manual_seed(2)
    worst = 0.0
    for n in LENGTHS:
        ids = torch.randint(0, model.dims.vocab, (n,), generator=gen)
        ours = _ours(model, ids)
        with torch.no_grad():
            theirs = hf(ids[None]).logits[0]
        # float32 on both sides: only summation order differs.
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        worst = max(worst, (ours - theirs).abs().max().item())
    return worst


@pytest.mark.parametrize("dims", [MODEL_PRESETS["llama-tiny"], QWEN], ids=["llama", "qwen2"])
def test_transformers_gives_our_logits(dims: ModelDims, tmp_path: Path) -> None:
    model = _model(dims)
    files = write_hf(model.state_dict(), dims, tmp_path / "hf")
    assert [f.name for f in files] == ["model.safetensors", "config.json"]
    assert all(f.is_file() for f in files)
    config = json.loads(files[1].read_text())
    assert config["model_type"] == ("qwen2" if dims.qkv_bias else "llama")
    print(f"max |logits diff| {_check_logits(model, tmp_path / 'hf'):.2e}")


def test_user_config_keeps_its_fields(tmp_path: Path) -> None:
    src = tmp_path / "config.json"
    src.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 1,
        "num_hidden_layers": 2, "vocab_size": 200, "max_position_embeddings": 256,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 3, "eos_token_id": 4, "torch_dtype": "bfloat16",
    }))
    dims = ModelSpec(hf_config=str(src)).resolve()
    model = _model(dims)
    write_hf(model.state_dict(), dims, tmp_path / "hf", hf_config=src)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == {**json.loads(src.read_text()), "torch_dtype": "float32"}
    _check_logits(model, tmp_path / "hf")
    tiny = MODEL_PRESETS["llama-tiny"]  # a file that does not describe the weights
    with pytest.raises(UserError, match="does not describe"):
        write_hf(Decoder(tiny).state_dict(), tiny, tmp_path / "other", hf_config=src)
    assert not (tmp_path / "other").exists()


def test_stray_tensor_is_named(tmp_path: Path) -> None:
    dims = MODEL_PRESETS["llama-tiny"]
    state = {f"decoder.{k}": v for k, v in Decoder(dims).state_dict().items()}
    state["decoder.layers.9.ffn_norm.weight"] = torch.ones(dims.hidden)
    with pytest.raises(UserError, match=r"layers\.9\.ffn_norm\.weight"):
        write_hf(state, dims, tmp_path / "hf")
    del state["decoder.layers.9.ffn_norm.weight"], state["decoder.norm.weight"]
    with pytest.raises(UserError, match=r"lacks 'norm\.weight'"):
        write_hf(state, dims, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_folder_in_use(tmp_path: Path) -> None:
    dims = MODEL_PRESETS["llama-tiny"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        write_hf(Decoder(dims).state_dict(), dims, out)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
