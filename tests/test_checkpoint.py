"""Loading and saving Hugging Face checkpoints: round trips, transformers compatibility, clear errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_checkpoint
from nanotorl.checkpoint import load_config, load_model, save_model
from nanotorl.demo import save_demo_tokenizer
from nanotorl.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_hf_checkpoint(path)
    return path


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_save_then_load_round_trips_bit_exactly(ckpt, tmp_path, family):
    if family == "qwen3":
        ckpt = tmp_path / "qwen3"
        make_hf_checkpoint(ckpt, model_type="qwen3", head_dim=40)
    model = load_model(ckpt)
    save_model(model, tmp_path / "out")
    again = load_model(tmp_path / "out")
    assert again.cfg == model.cfg
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


FAMILIES = {"qwen2": {}, "qwen3": dict(model_type="qwen3", head_dim=24, num_key_value_heads=1)}
CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_our_checkpoint_and_agrees(tmp_path, tied, family):
    """Save -> transformers' Auto class picks the same architecture from our config.json and computes the same
    logits (weights changed after loading, so nothing passes by reading the original back)."""
    transformers = pytest.importorskip("transformers")
    make_hf_checkpoint(tmp_path / "hf", tie_word_embeddings=tied, **FAMILIES[family])
    ours = load_model(tmp_path / "hf")
    with torch.no_grad():  # change every weight so the comparison cannot pass by reading the original back
        for p in ours.parameters():
            p.mul_(1.5)
    save_model(ours, tmp_path / "ours", shard_bytes=20_000)  # force several shards
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(hf).__name__ == CLASSES[family] and hf.config.tie_word_embeddings == tied
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


def _config_with(tmp_path, base, **changes):
    raw = json.loads((base / "config.json").read_text()) | changes
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not DROP}))
    return tmp_path


DROP = object()  # a key to leave out of config.json
REFUSED = {  # config.json changes -> what the error must name (found, then supported)
    "qwen3-moe": (dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=8),
                  r"mixture-of-experts.*qwen3_moe.*Qwen3MoeForCausalLM.*'qwen3'"),
    "qwen2-moe": (dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]),
                  r"mixture-of-experts.*qwen2_moe"),
    "experts-in-dense-type": (dict(num_experts=4), r"mixture-of-experts.*'num_experts': 4"),
    "sliding-window": (dict(use_sliding_window=True, sliding_window=256), r"sliding-window.*use_sliding_window=True"),
    "sliding-layers": (dict(layer_types=["full_attention", "sliding_attention"]),
                       r"sliding-window.*\['sliding_attention'\]"),
    "yarn-scaling": (dict(rope_scaling={"type": "yarn", "factor": 4.0}), r"rope_scaling of type 'yarn'.*default"),
    "linear-rope-type": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"type 'linear'"),
    "llama3-rope-parameters": (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
                               r"rope_parameters of type 'llama3'"),
    "unknown-model-type": (dict(model_type="llama", architectures=["LlamaForCausalLM"]),
                           r"expected model_type 'qwen2'.*'qwen3'.*found model_type='llama'.*LlamaForCausalLM"),
    "type-and-class-disagree": (dict(model_type="qwen3", architectures=["Qwen2ForCausalLM"]),
                                r"found model_type='qwen3', architectures=\['Qwen2ForCausalLM'\]"),
    "no-model-type": (dict(model_type=DROP), r"found model_type=None"),
    "gelu": (dict(hidden_act="gelu"), r"hidden_act 'gelu'.*'silu'"),
    "qwen3-attention-bias": (dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=True),
                             r"attention_bias"),
    "missing-shape-key": (dict(num_key_value_heads=DROP), r"lacks \['num_key_value_heads'\]"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_configs_are_refused_naming_what_was_found(ckpt, tmp_path, case):
    changes, message = REFUSED[case]
    with pytest.raises(ValueError, match=message):
        load_config(_config_with(tmp_path, ckpt, **changes))


@pytest.mark.parametrize("changes", [
    dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=DROP, tie_word_embeddings=DROP),
    dict(head_dim=DROP, tie_word_embeddings=DROP, rope_theta=DROP, max_position_embeddings=DROP, rms_norm_eps=DROP),
    dict(head_dim=8, rope_theta=DROP, rope_parameters={"rope_type": "default", "rope_theta": 123.0}),
    dict(architectures=DROP, use_sliding_window=False, sliding_window=4096, max_window_layers=21, rope_scaling=None),
], ids=["qwen3-defaults", "qwen2-defaults", "rope-parameters", "qwen2.5-math-style"])
def test_config_reads_as_transformers_does(ckpt, tmp_path, changes):
    """Keys a config.json leaves out take transformers' defaults (Qwen3's head_dim is 128, not hidden/heads)."""
    transformers = pytest.importorskip("transformers")
    path = _config_with(tmp_path, ckpt, **changes)
    ours, ref = load_config(path), transformers.AutoConfig.from_pretrained(path)
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings"):
        assert getattr(ours, key) == getattr(ref, key), key
    ref_theta = ref.rope_parameters["rope_theta"] if hasattr(ref, "rope_parameters") else ref.rope_theta  # v5 / v4
    assert ours.rope_theta == ref_theta
    assert ours.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert (ours.qkv_bias, ours.qk_norm) == ((False, True) if ref.model_type == "qwen3" else (True, False))


@pytest.mark.parametrize("eos_ids, written", [([5], 5), ([7, 5], [7, 5])], ids=["one", "several"])
def test_end_ids_are_written_as_transformers_reads_them(ckpt, tmp_path, eos_ids, written):
    transformers = pytest.importorskip("transformers")
    save_model(load_model(ckpt), tmp_path, eos_ids=eos_ids)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == written
    assert transformers.AutoConfig.from_pretrained(tmp_path).eos_token_id == written


def test_saved_checkpoint_keeps_the_tokenizers_end_ids_and_chat_template(ckpt, tmp_path):
    """What a trained checkpoint needs to be prompted and stopped as its base was: every end id (in config.json)
    and the chat template (chat_template.jinja, transformers v5's file) travel with the weights."""
    src = tmp_path / "src"
    save_demo_tokenizer(src)
    (src / "chat_template.jinja").write_text("{{ messages[0].content }}|{{ add_generation_prompt }}")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    tok = Tokenizer(src, "chat")
    save_model(load_model(ckpt), tmp_path / "out", tokenizer_dir=src, eos_ids=tok.eos_ids)
    again = Tokenizer(tmp_path / "out", "chat")
    assert again.eos_ids == tok.eos_ids == [0, 5] and again.prompt("1+1") == tok.prompt("1+1")


# ------------------------------------------------------------------------------ training checkpoints (torchrun)


def torchrun(nproc, *args):
    from test_train import torchrun as run
    r = run(nproc, "tests/dist_ckpt.py", *map(str, args))
    assert r.returncode == 0, r.stderr[-3000:]


def test_a_checkpoint_saved_on_two_processes_resumes_on_one_and_on_two(tmp_path):
    """Weights and AdamW state (moments and step count) after the resume equal those that were saved, whatever the
    number of processes that read them back: each rank wrote its own shards, each reader takes what it needs."""
    torchrun(2, "save", tmp_path)
    saved = torch.load(tmp_path / "saved.pt")
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (ckpt / "optimizer" / ".metadata").is_file() and not (ckpt / "trainer.pt").exists()
    assert sorted(p.name for p in (ckpt / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    for world in (1, 2):
        torchrun(world, "resume", tmp_path)
        resumed = torch.load(tmp_path / f"resumed{world}.pt")
        assert resumed["step"] == 2
        assert saved["weights"].keys() == resumed["weights"].keys()
        for k, v in saved["weights"].items():
            assert torch.equal(resumed["weights"][k], v), (world, k)
        a, b = saved["optimizer"]["state"], resumed["optimizer"]["state"]
        assert a.keys() == b.keys() and len(a) == len(saved["weights"])
        for name in a:
            assert a[name].keys() == b[name].keys() == {"step", "exp_avg", "exp_avg_sq"}
            for key in a[name]:
                assert torch.equal(b[name][key], a[name][key]), (world, name, key)
        assert resumed["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]


def test_no_rank_holds_more_than_its_own_optimizer_shard_while_saving(tmp_path):
    """Peak RSS added by save_checkpoint on each of 2 ranks, 13.5M parameters: below the rank's own share of the
    AdamW state (gathering the whole optimizer, or all the weights, on one rank adds twice that)."""
    torchrun(2, "memory", tmp_path)
    for rank in (0, 1):
        m = json.loads((tmp_path / f"memory{rank}.json").read_text())
        assert m["optimizer_shard"] > 50e6
        assert m["added"] < m["optimizer_shard"], (rank, m)


def test_a_checkpoint_of_the_older_layout_still_resumes(ckpt, tmp_path):
    """trainer.pt (the whole optimizer, written by one process) is read back as before."""
    from nanotorl.training_checkpoint import latest_checkpoint, resume
    model = load_model(ckpt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (1, 5))
    model.token_logprobs(ids, ids).sum().backward()
    optimizer.step()
    old = tmp_path / "checkpoints" / "step_000003"
    save_model(model, old)
    torch.save({"optimizer": optimizer.state_dict(), "step": 3, "world": 1, "config": {}}, old / "trainer.pt")
    again = load_model(latest_checkpoint(tmp_path))
    fresh = torch.optim.AdamW(again.parameters(), lr=1e-2)
    assert resume(again, fresh, old, rank=0, world=1) == 3
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], fresh.state[q]["exp_avg_sq"]) and p.grad is not None
