"""A thin layer over the ``tokenizers`` library: a checkpoint's ``tokenizer.json`` plus its special ids.

The special ids come from the checkpoint's own config files: ``eos`` from ``tokenizer_config.json``'s
``eos_token`` (else ``config.json``'s ``eos_token_id``), ``pad`` from ``pad_token`` (else eos). Base Qwen2.5
models end with ``<|endoftext|>`` (151643). Text is encoded without any added special tokens (the ToRL prompt
has none) and decoded with every token kept, so decode(encode(s)) == s.
"""
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


def _token_text(value):
    """Special tokens are stored as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, path):
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: the checkpoint directory needs a tokenizers-format "
                                    f"tokenizer.json")
        self.path = path
        self.tk = HFTokenizer.from_file(str(file))
        config = self._read(path / "tokenizer_config.json")
        model_config = self._read(path / "config.json")
        self.eos_id = self._special_id(config.get("eos_token"), model_config.get("eos_token_id"), "eos")
        self.pad_id = self._special_id(config.get("pad_token"), None, "pad", default=self.eos_id)

    @staticmethod
    def _read(file: Path) -> dict:
        return json.loads(file.read_text()) if file.is_file() else {}

    def _special_id(self, token, fallback_id, what, default=None) -> int:
        token = _token_text(token)
        if token is not None:
            token_id = self.tk.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{self.path}: {what} token {token!r} is not in tokenizer.json's vocabulary")
            return token_id
        if isinstance(fallback_id, list):
            fallback_id = fallback_id[0]
        if fallback_id is not None:
            return int(fallback_id)
        if default is not None:
            return default
        raise ValueError(f"{self.path}: no {what} token: set eos_token in tokenizer_config.json "
                         f"or eos_token_id in config.json")

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def prompt_ids(self, problem: str) -> list[int]:
        """Token ids of the ToRL prompt for ``problem`` (see :data:`nanotorl.data.TORL_TEMPLATE`)."""
        from nanotorl.data import torl_prompt
        return self.encode(torl_prompt(problem))
