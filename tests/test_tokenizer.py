"""The tokenizer layer against the real Qwen2.5 tokenizer in ../shared (ids checked against tiktoken there)."""
import json
import shutil

import pytest

from conftest import shared_path
from nanotorl.demo import save_demo_tokenizer
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


def _configs(path, tokenizer_config=None, config=None, generation_config=None):
    shutil.copy(shared_path("tokenizers", "qwen2.5", "tokenizer.json"), path)
    for name, content in [("tokenizer_config.json", tokenizer_config), ("config.json", config),
                          ("generation_config.json", generation_config)]:
        (path / name).unlink(missing_ok=True)
        if content is not None:
            (path / name).write_text(json.dumps(content))
    return Tokenizer(path)


@pytest.mark.parametrize("files, eos_id, eos_ids", [
    # Qwen2.5-Instruct / Qwen3 instruct: <|im_end|> ends a turn, generation_config also stops at <|endoftext|>
    (({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, {"eos_token_id": 151645},
      {"eos_token_id": [151645, 151643]}), 151645, [151645, 151643]),
    # a base model: one id everywhere
    (({"eos_token": "<|endoftext|>"}, {"eos_token_id": 151643}, {"eos_token_id": 151643}), 151643, [151643]),
    # no eos_token: the first id of config.json is the primary one, every listed id ends a response
    ((None, {"eos_token_id": [151643, 151645]}, {"eos_token_id": 151644}), 151643, [151643, 151644, 151645]),
    ((None, None, {"eos_token_id": [151645, 151643]}), 151645, [151645, 151643]),
    (({"eos_token": {"content": "<|im_end|>"}}, {"eos_token_id": None}, {}), 151645, [151645]),
], ids=["instruct", "base", "config-list", "generation-config-only", "token-only"])
def test_every_end_id_is_kept_and_eos_id_is_the_primary_one(tmp_path, files, eos_id, eos_ids):
    tok = _configs(tmp_path, *files)
    assert (tok.eos_id, tok.eos_ids) == (eos_id, eos_ids)


@pytest.mark.parametrize("bad", [999_999, "151645", [151645, -1], True])
def test_end_ids_that_are_not_tokens_are_refused_naming_the_file(tmp_path, bad):
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id .* not ids of tokenizer.json's"):
        _configs(tmp_path, {"eos_token": "<|im_end|>"}, None, {"eos_token_id": bad})


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


def test_token_bytes_are_what_the_decoder_makes_of_each_token(qwen):
    """Every id of the vocabulary: its bytes, read as UTF-8 (invalid sequences replaced), are what the tokenizers
    library decodes the token to; and the bytes of a text's tokens, joined, are the text's bytes, where a
    character is cut between tokens too."""
    for i in range(qwen.vocab_size):
        assert qwen.token_bytes(i).decode("utf-8", "replace") == qwen.decode([i]), i
    text = "数学 🦜🧬 ```python\r\n\tprint('é')\n<|endoftext|>"
    ids = qwen.encode(text)
    assert any(b"\xef\xbf\xbd" in qwen.decode([i]).encode() for i in ids)  # some token holds part of a character
    assert b"".join(qwen.token_bytes(i) for i in ids) == text.encode()


def test_token_bytes_of_the_demo_tokenizer(tmp_path):
    save_demo_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    text = "```python\nprint(6 * 7)\n```\n```output\n42\n```\nThe answer is \\boxed{42}<|endoftext|>"
    ids = tok.encode(text)
    assert len(ids) < len(text)  # whole-phrase tokens among the characters
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
