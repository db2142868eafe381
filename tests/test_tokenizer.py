"""The tokenizer layer against the real Qwen2.5 tokenizer in ../shared (ids checked against tiktoken there)."""
import json
import shutil

import pytest

from conftest import shared_path
from nanotorl.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def qwen():
    return Tokenizer(shared_path("tokenizers", "qwen2.5"))


def test_known_ids(qwen):
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("<|im_start|>user\nHi<|im_end|>") == [151644, 872, 198, 13048, 151645]


def test_special_ids_come_from_the_checkpoint_config(qwen, tmp_path):
    assert qwen.eos_id == 151643 and qwen.pad_id == 151643
    src = shared_path("tokenizers", "qwen2.5")
    shutil.copy(src / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    tok = Tokenizer(tmp_path)
    assert (tok.eos_id, tok.pad_id) == (151645, 151645)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 151644}))
    assert Tokenizer(tmp_path).eos_id == 151644
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="no eos token"):
        Tokenizer(tmp_path)


def test_unknown_special_token_is_a_clear_error(tmp_path):
    shutil.copy(shared_path("tokenizers", "qwen2.5", "tokenizer.json"), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="'<\\|nope\\|>' is not in"):
        Tokenizer(tmp_path)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("text", ["```python\nprint(2**10)\n```\n```output\n1024\n```\n",
                                  "So $\\frac{1}{2}$ and \\boxed{42}. 数学 🙂", "x.```\n\n"])
def test_round_trip_is_lossless(qwen, text):
    assert qwen.decode(qwen.encode(text)) == text


def test_closing_fence_is_split_across_tokens_as_documented(qwen):
    # ../shared/tokenizers/qwen2.5/README.md: "```\n" after code is "``" + "`\n"; the generator must cope
    ids = qwen.encode("print(1)\n```\n")
    assert ids[-2:] == [13874, 3989]


def test_torl_prompt_ids(qwen):
    ids = qwen.prompt_ids("What is 1+1?")
    text = qwen.decode(ids)
    assert text.startswith("A conversation between User and Assistant.")
    assert text.endswith("What is 1+1?\nAssistant:")
