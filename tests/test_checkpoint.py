"""Loading and saving Hugging Face checkpoints: round trips, transformers compatibility, clear errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_checkpoint
from nanotorl.checkpoint import load_config, load_model, save_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_hf_checkpoint(path)
    return path


def test_save_then_load_round_trips_bit_exactly(ckpt, tmp_path):
    model = load_model(ckpt)
    save_model(model, tmp_path / "out")
    again = load_model(tmp_path / "out")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_our_checkpoint_and_agrees(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    make_hf_checkpoint(tmp_path / "hf", tie_word_embeddings=tied)
    ours = load_model(tmp_path / "hf")
    with torch.no_grad():  # change every weight so the comparison cannot pass by reading the original back
        for p in ours.parameters():
            p.mul_(1.5)
    save_model(ours, tmp_path / "ours", shard_bytes=20_000)  # force several shards
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), hf(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(load_model(tmp_path / "ours").embed_tokens.weight, ours.embed_tokens.weight)


def test_bf16_checkpoint_loads_in_its_own_dtype(tmp_path):
    make_hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert load_model(tmp_path).embed_tokens.weight.dtype == torch.bfloat16
    assert load_model(tmp_path, dtype=torch.float32).embed_tokens.weight.dtype == torch.float32


def _rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    make_hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_other_architecture_is_refused_naming_what_was_found(ckpt, tmp_path):
    raw = json.loads((ckpt / "config.json").read_text())
    raw.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="found model_type='llama'.*LlamaForCausalLM"):
        load_config(tmp_path)


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    make_hf_checkpoint(tmp_path)

    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        t["model.layers.9.extra.weight"] = torch.zeros(2)
    _rewrite_weights(tmp_path, edit)
    with pytest.raises(ValueError, match=r"missing tensors \[model.layers.1.mlp.up_proj.weight\].*"
                                         r"unexpected tensors \[model.layers.9.extra.weight\]"):
        load_model(tmp_path)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    make_hf_checkpoint(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \[65\], the config implies \[64\]"):
        load_model(tmp_path)
