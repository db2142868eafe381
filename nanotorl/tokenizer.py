"""A thin layer over the ``tokenizers`` library: a checkpoint's ``tokenizer.json``, its special ids and its prompt.

The special ids come from the checkpoint's own config files. ``eos_id``, the one id for what needs one (the end
of a supervised trace), is ``tokenizer_config.json``'s ``eos_token``, else the first ``eos_token_id`` of
``config.json``, else of ``generation_config.json``. ``eos_ids`` are every id a response may end with: eos_id,
then the ``eos_token_id`` lists of ``generation_config.json`` and ``config.json`` (instruct models end a turn with
``<|im_end|>`` 151645 and also stop at ``<|endoftext|>`` 151643; base Qwen2.5 models have 151643 alone). ``pad``
is ``pad_token``, else eos_id. Text is encoded without any added special tokens (a prompt's special tokens are in
its text) and decoded with every token kept, so decode(encode(s)) == s. :meth:`Tokenizer.prompt` is the prompt of
a problem, ToRL's or the checkpoint's chat template (:mod:`nanotorl.prompt`).

:meth:`Tokenizer.token_bytes` gives the exact bytes of one token, which the generator reads its responses from
(:mod:`nanotorl.fences`). In byte-level BPE (Qwen, Llama 3, GPT-2) a token may hold part of a UTF-8 character
("😀" is 4 bytes, often 2 tokens), which decoding the token alone would turn into U+FFFD: its vocabulary stores
every byte as one printable character (GPT-2's ``bytes_to_unicode`` table, :data:`BYTE_LEVEL`), mapped back here.
"""
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from nanotorl.cli import read_json
from nanotorl.prompt import make_prompt


def _byte_level() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the 68 others (control
    characters, space, DEL, NBSP, soft hyphen...) for the characters 256, 257, ... in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + n): b for n, b in enumerate(moved)}


BYTE_LEVEL = _byte_level()  # character of a byte-level BPE token -> the byte it stands for


def _token_text(value):
    """Special tokens are stored as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, path, prompt_template: str = "torl", template_vars: dict | None = None, compat: str = "none"):
        """``prompt_template``, ``template_vars`` and ``compat``: see :mod:`nanotorl.prompt`."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: the checkpoint directory needs a tokenizers-format "
                                    f"tokenizer.json")
        self.path = path
        try:
            self.tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # what the tokenizers library raises for a file it cannot read
            raise ValueError(f"{file}: not a tokenizers-format tokenizer.json ({e})") from None
        config = self._read(path / "tokenizer_config.json")
        model_ids, generation_ids = (self._eos_list(path / name) for name in ("config.json", "generation_config.json"))
        fallback = next(iter(model_ids + generation_ids), None)
        self.eos_id = self._special_id(config.get("eos_token"), fallback, "eos")
        self.eos_ids = list(dict.fromkeys([self.eos_id] + generation_ids + model_ids))  # in order, no repeats
        self.pad_id = self._special_id(config.get("pad_token"), None, "pad", default=self.eos_id)
        self.prompt = make_prompt(prompt_template, path, config, template_vars, compat)  # problem -> prompt text
        self._byte_level = isinstance(self.tk.decoder, decoders.ByteLevel)
        self._added = {i: t.content for i, t in self.tk.get_added_tokens_decoder().items()}
        self._bytes = {}  # token id -> its bytes, filled as tokens are met

    @staticmethod
    def _read(file: Path) -> dict:
        return read_json(file) if file.is_file() else {}

    def _eos_list(self, file: Path) -> list[int]:
        """The ``eos_token_id`` of a config file as a list (it is an id, a list of ids, or absent)."""
        value = self._read(file).get("eos_token_id")
        ids = [] if value is None else value if isinstance(value, list) else [value]
        bad = [i for i in ids if type(i) is not int or not 0 <= i < self.vocab_size or self.tk.id_to_token(i) is None]
        if bad:
            raise ValueError(f"{file}: eos_token_id {value} holds {bad}, not ids of tokenizer.json's "
                             f"{self.vocab_size} tokens; fix eos_token_id there")
        return ids

    def _special_id(self, token, fallback_id, what, default=None) -> int:
        token = _token_text(token)
        if token is not None:
            token_id = self.tk.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{self.path}: {what} token {token!r} is not in tokenizer.json's vocabulary")
            return token_id
        if fallback_id is not None:
            return int(fallback_id)
        if default is not None:
            return default
        raise ValueError(f"{self.path}: no {what} token: set eos_token in tokenizer_config.json "
                         f"or eos_token_id in config.json or generation_config.json")

    @cached_property
    def vocab_size(self) -> int:
        """One past the largest id with a token (added tokens included): the ids the model may produce."""
        return 1 + max(self.tk.get_vocab(with_added_tokens=True).values())

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for: exact for byte-level BPE (partial UTF-8 characters included),
        for added tokens (special ones too: their text) and for tokenizers whose tokens decode on their own (the
        demo's); none for an id without a token (the model never samples ids past the tokenizer's, nanotorl.model,
        but an id inside them may have no token)."""
        data = self._bytes.get(token_id)
        if data is None:
            if self.tk.id_to_token(token_id) is None:
                data = b""
            elif token_id in self._added:
                data = self._added[token_id].encode()
            elif self._byte_level:
                data = bytes(BYTE_LEVEL[ch] for ch in self.tk.id_to_token(token_id))
            else:
                data = self.decode([token_id]).encode()
            self._bytes[token_id] = data
        return data

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def prompt_ids(self, problem: str) -> list[int]:
        """Token ids of the prompt for ``problem`` (:meth:`prompt`): what training and evaluation generate from."""
        return self.encode(self.prompt(problem))
