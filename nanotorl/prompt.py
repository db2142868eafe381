"""Prompts: the problem -> the text the policy is given, for training and evaluation alike.

Two templates, chosen with ``--prompt-template``:
  * ``torl`` (default): the paper's plain-text prompt for base models, :data:`nanotorl.data.TORL_TEMPLATE`;
  * ``chat``: the checkpoint's own chat template (``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template``), rendered with one user message, the ToRL instruction then the problem, and the generation
    prompt added, as transformers' ``apply_chat_template`` renders it: jinja2's ``ImmutableSandboxedEnvironment``
    (a template is code that came with the checkpoint: it may read its inputs, never change them or reach Python
    internals) with ``trim_blocks`` and ``lstrip_blocks``, loop controls, a ``tojson`` that keeps non-ASCII and
    HTML characters, ``raise_exception`` and ``strftime_now``; the template sees ``messages``, ``tools`` and
    ``documents`` (None), ``add_generation_prompt``, the special tokens set in ``tokenizer_config.json``
    (``eos_token``...), and the template variables given with ``--template-vars`` (a JSON object, e.g.
    ``{"enable_thinking": false}`` for Qwen3), which override the special tokens.

With ``compat="torl"`` (``--compat torl``) the torl prompt is ToRL's own, byte for byte
(:func:`nanotorl.data.torl_exact_prompt`: a newline after "Assistant:"); the chat template has no ToRL original.
"""
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanotorl.data import torl_exact_prompt, torl_prompt, torl_user_message
from nanotorl.tool import COMPAT

PROMPT_TEMPLATES = ("torl", "chat")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def parse_template_vars(text: str) -> dict:
    """``--template-vars`` text -> a dict ("" -> {}); anything but a JSON object is an error that shows it."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--template-vars must be a JSON object such as '{{\"enable_thinking\": false}}', "
                         f"got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--template-vars must be a JSON object such as '{{\"enable_thinking\": false}}', "
                         f"got {text!r}")
    return value


def make_prompt(template: str, path, tokenizer_config: dict, variables: dict | None = None, compat: str = "none"):
    """A function problem -> prompt text for ``template`` (one of :data:`PROMPT_TEMPLATES`); ``path`` is the
    checkpoint directory, ``tokenizer_config`` its parsed ``tokenizer_config.json``; ``compat`` one of
    :data:`nanotorl.tool.COMPAT` (module docstring)."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {list(PROMPT_TEMPLATES)}")
    if compat not in COMPAT:
        raise ValueError(f"compat must be one of {list(COMPAT)}, got {compat!r}")
    if compat == "torl" and template != "torl":
        raise ValueError(f"compat 'torl' prompts with ToRL's own base-model prompt, got --prompt-template "
                         f"{template}: pass --prompt-template torl, or --compat none")
    if template == "torl":
        if variables:
            raise ValueError(f"template variables {variables} only apply to --prompt-template chat; the torl "
                             f"prompt has none")
        return torl_exact_prompt if compat == "torl" else torl_prompt
    compiled = compile_chat_template(chat_template_source(Path(path), tokenizer_config))
    special = {k: v.get("content") if isinstance(v, dict) else v for k in SPECIAL_TOKENS
               if (v := tokenizer_config.get(k)) is not None}
    context = special | (variables or {})

    def prompt(problem: str) -> str:
        messages = [{"role": "user", "content": torl_user_message(problem)}]
        return compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=True, **context)
    return prompt


def chat_template_source(path: Path, tokenizer_config: dict) -> str:
    """The checkpoint's chat template: ``chat_template.jinja`` (transformers v5 saves it there), else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates: "default")."""
    file = path / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source}
        if "default" not in named:
            raise ValueError(f"{path}: tokenizer_config.json has named chat templates {sorted(named)} but no "
                             f"'default' one to prompt with")
        source = named["default"]
    if not source:
        raise ValueError(f"{path} has no chat template (neither chat_template.jinja nor a chat_template in "
                         f"tokenizer_config.json): a base model; use --prompt-template torl")
    return source


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for transformers' masks): renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled in the sandboxed environment described in the module docstring."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
