"""Shared fixtures: random Hugging Face Qwen2 checkpoints and the path to ../shared."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts) -> Path:
    """A path under ../shared, or a skip that says why the test cannot run."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared fixtures beside the repository")
    return path


def make_hf_checkpoint(path, seed=0, dtype=torch.float32, **overrides):
    """Save a random ``transformers`` Qwen2ForCausalLM with non-trivial weights (biases and norms included)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (dev extra)")
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
               rms_norm_eps=1e-6)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model = model.to(dtype).eval()
    model.save_pretrained(path)
    return model
