"""Prompts against transformers' apply_chat_template, on Qwen2.5-instruct- and Qwen3-style templates
(tests/chat_templates), and the sandbox around them."""
import json
import shutil
from pathlib import Path

import jinja2
import pytest

from conftest import shared_path
from nanotorl.data import TORL_INSTRUCTION, torl_prompt, torl_user_message
from nanotorl.demo import save_demo_tokenizer
from nanotorl.prompt import compile_chat_template, parse_template_vars
from nanotorl.tokenizer import Tokenizer

TEMPLATES = {p.stem: p.read_text() for p in sorted((Path(__file__).parent / "chat_templates").glob("*.jinja"))}
PROBLEMS = ["What is $1 + 1$?",
            "Let {{ x }} and {% y %} be \"quoted\" 'strings' <b>; find \\boxed{x}.\n\nTwo lines, 数学 🙂",
            "  leading and trailing spaces  \n"]
VARIABLES = [{}, {"enable_thinking": False}, {"enable_thinking": True}]


def chat_checkpoint(path, template, tokenizer_dir=None, how="config"):
    """A tokenizer directory with ``template`` as its chat template: in tokenizer_config.json (``config``), as
    a list of named templates (``named``) or in chat_template.jinja (``file``, transformers v5's layout)."""
    path.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        save_demo_tokenizer(path)
    else:
        shutil.copy(Path(tokenizer_dir) / "tokenizer.json", path)
    config = json.loads((path / "tokenizer_config.json").read_text()) if tokenizer_dir is None else {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if how == "file":
        (path / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template if how == "config" else [
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
            {"name": "default", "template": template}]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def hf_tokenizer(path):
    transformers = pytest.importorskip("transformers", reason="transformers is the chat-template reference (dev extra)")
    return transformers.AutoTokenizer.from_pretrained(path)


def user_turn(problem):
    return [{"role": "user", "content": torl_user_message(problem)}]


@pytest.mark.parametrize("variables", VARIABLES, ids=["no-vars", "thinking-off", "thinking-on"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_prompt_equals_apply_chat_template(tmp_path, name, variables):
    path = chat_checkpoint(tmp_path, TEMPLATES[name])
    ours, hf = Tokenizer(path, "chat", variables), hf_tokenizer(path)
    for problem in PROBLEMS:
        ref = hf.apply_chat_template(user_turn(problem), tokenize=False, add_generation_prompt=True, **variables)
        assert ours.prompt(problem) == ref
        assert f"<|im_start|>user\n{TORL_INSTRUCTION}\n{problem}<|im_end|>\n<|im_start|>assistant\n" in ref
    thinking_off = name == "qwen3" and variables.get("enable_thinking") is False
    assert ours.prompt("x").endswith("<think>\n\n</think>\n\n") == thinking_off


# No whitespace control in the tags: what trim_blocks and lstrip_blocks remove shows; the special tokens of
# tokenizer_config.json are variables, and template variables override them.
PLAIN = """{{ bos_token or '' }}{% for message in messages %}
    {% if message.role == 'user' %}
<|im_start|>user
{{ message.content }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


@pytest.mark.parametrize("variables", [{}, {"eos_token": "<END>", "bos_token": "<BOS>"}])
def test_whitespace_and_special_tokens_as_transformers(tmp_path, variables):
    path = chat_checkpoint(tmp_path, PLAIN)
    ref = hf_tokenizer(path).apply_chat_template(user_turn("1+1"), tokenize=False, add_generation_prompt=True,
                                                 **variables)
    assert Tokenizer(path, "chat", variables).prompt("1+1") == ref
    assert ref.startswith(variables.get("bos_token", "") + "<|im_start|>user\n")


@pytest.mark.parametrize("how", ["named", "file"])
def test_template_is_found_where_transformers_finds_it(tmp_path, how):
    path = chat_checkpoint(tmp_path, TEMPLATES["qwen3"], how=how)
    ref = hf_tokenizer(path).apply_chat_template(user_turn("1+1"), tokenize=False, add_generation_prompt=True)
    assert Tokenizer(path, "chat").prompt("1+1") == ref


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prompt_ids_equal_transformers_with_the_real_qwen_tokenizer(tmp_path, name):
    """Special tokens in the rendered text (<|im_start|>...) become their single ids, as transformers encodes them."""
    path = chat_checkpoint(tmp_path, TEMPLATES[name], shared_path("tokenizers", "qwen2.5"))
    ours, hf = Tokenizer(path, "chat", {"enable_thinking": False}), hf_tokenizer(path)
    for problem in PROBLEMS:
        text = hf.apply_chat_template(user_turn(problem), tokenize=False, add_generation_prompt=True,
                                      enable_thinking=False)
        ids = ours.prompt_ids(problem)
        assert ids == hf(text, add_special_tokens=False)["input_ids"]
        assert ids[:3] == [151644, 872, 198] or ids[:3] == [151644, 8948, 198]  # <|im_start|>user|system \n
    assert ours.eos_id == 151645


CONVERSATION = [
    {"role": "system", "content": "Solve with code."},
    {"role": "user", "content": "What is 2**10?"},
    {"role": "assistant", "content": "<think>\nuse python\n</think>\n\n",
     "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": {"code": "print(2**10)"}}}]},
    {"role": "tool", "content": "1024"},
    {"role": "tool", "content": "done <ok> é"},
    {"role": "assistant", "content": "It is \\boxed{1024}.", "reasoning_content": "the tool said 1024"},
    {"role": "user", "content": "And 3**3?"},
]
CODE = {"type": "object", "properties": {"code": {"type": "string"}}}
TOOLS = [{"type": "function",
          "function": {"name": "python", "description": "Run <code> & print, é", "parameters": CODE}}]
# The helpers transformers gives a template: loop controls, tojson (HTML and non-ASCII kept, options), raise_exception,
# the special tokens as variables, {% generation %} blocks.
HELPERS = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}|"
           "{{ m | tojson(indent=2, sort_keys=true) }}{% endfor %}{{ eos_token }}{{ pad_token }}"
           "{% generation %}{{ tools | tojson }}{% endgeneration %}"
           "{% if messages | length > 99 %}{{ raise_exception('too long') }}{% endif %}{{ strftime_now('%Y') }}")


@pytest.mark.parametrize("name", list(TEMPLATES) + ["helpers"])
def test_sandboxed_environment_renders_conversations_as_transformers_does(tmp_path, name):
    """Whole conversations (system turn, reasoning, tool calls and results, tools listed) through our environment."""
    template = TEMPLATES.get(name, HELPERS)
    path = chat_checkpoint(tmp_path, template, shared_path("tokenizers", "qwen2.5"))
    hf = hf_tokenizer(path)
    for messages, tools in ((CONVERSATION, None), (CONVERSATION, TOOLS), (CONVERSATION[1:5], TOOLS)):
        ref = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        got = compile_chat_template(template).render(messages=messages, tools=tools, documents=None,
                                                     add_generation_prompt=True, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>")
        assert got == ref


@pytest.mark.parametrize("template", [
    "{{ messages.append(1) }}",                             # inputs are read-only
    "{{ messages[0].update(role='system') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",       # no Python internals
    "{{ raise_exception.__globals__['os'] }}",
    "{{ cycler.__init__.__globals__.os }}",
])
def test_template_cannot_change_its_inputs_or_reach_python_internals(tmp_path, template):
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer(chat_checkpoint(tmp_path, template), "chat").prompt("1+1")


def test_raise_exception_in_a_template_is_a_template_error(tmp_path):
    path = chat_checkpoint(tmp_path, "{{ raise_exception('only system and user roles, found ' + messages[0].role) }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="found user"):
        Tokenizer(path, "chat").prompt("1+1")


def test_torl_prompt_is_the_default_and_unchanged(tmp_path):
    path = chat_checkpoint(tmp_path, TEMPLATES["qwen3"])  # a chat template is there, but torl is the default
    tok = Tokenizer(path)
    assert tok.prompt("What is 1+1?") == torl_prompt("What is 1+1?")
    assert tok.prompt_ids("What is 1+1?") == tok.encode(torl_prompt("What is 1+1?"))


def test_clear_errors(tmp_path):
    base = tmp_path / "base"
    save_demo_tokenizer(base)
    with pytest.raises(ValueError, match="no chat template.*--prompt-template torl"):
        Tokenizer(base, "chat")
    with pytest.raises(ValueError, match="only apply to --prompt-template chat"):
        Tokenizer(base, "torl", {"enable_thinking": False})
    with pytest.raises(ValueError, match=r"unknown prompt template 'llama'.*\['torl', 'chat'\]"):
        Tokenizer(base, "llama")
    named = chat_checkpoint(tmp_path / "named", "x", how="named")
    config = json.loads((named / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"][:1]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"named chat templates \['tool_use'\] but no 'default'"):
        Tokenizer(named, "chat")


@pytest.mark.parametrize("text, expected", [
    ("", {}), ("  ", {}), ('{"enable_thinking": false}', {"enable_thinking": False}),
    ('{"a": [1, "b"], "c": null}', {"a": [1, "b"], "c": None})])
def test_template_vars_parse_as_a_json_object(text, expected):
    assert parse_template_vars(text) == expected


@pytest.mark.parametrize("text", ["enable_thinking=false", "[1, 2]", '"x"', "{'single': 'quotes'}"])
def test_template_vars_that_are_not_a_json_object_are_refused(text):
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_template_vars(text)


# ToRL's prompt as GAIR-NLP/ToRL's verl/utils/dataset/rl_dataset.py (commit cb78cf1) writes it, lines 33-34: a
# triple-quoted string, so the line break before its closing quotes is part of the prompt; __getitem__ (line 178)
# fills it with str.replace("[PROMPT]", problem), and torch_functional.tokenize_and_postprocess_data (line 269)
# encodes it without special tokens.
TIR_BASE_0309 = '''A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\nUser: Please integrate natural language reasoning with programs to solve the problem above, and put your final answer within \\boxed{}.\n[PROMPT]\nAssistant:
'''  # noqa: E501 (ToRL's line as it is)


def test_compat_torl_prompt_ids_equal_torls_template_on_the_real_qwen_tokenizer():
    """10 problems of ../shared/data: the prompt ids of --compat torl are those of ToRL's own template, encoded by
    the tokenizers library itself; the default prompt differs from it only by the newline after "Assistant:"."""
    from tokenizers import Tokenizer as HFTokenizer
    qwen_dir = shared_path("tokenizers", "qwen2.5")
    reference = HFTokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    problems = [json.loads(line)["problem"] for name in ("aime24.jsonl", "aime25.jsonl", "math500_subset.jsonl")
                for line in shared_path("data", name).read_text().splitlines()[:4]][:10]
    exact, default = Tokenizer(qwen_dir, compat="torl"), Tokenizer(qwen_dir)
    for problem in problems:
        text = TIR_BASE_0309.replace("[PROMPT]", problem)
        assert exact.prompt(problem) == text
        assert exact.prompt_ids(problem) == reference.encode(text, add_special_tokens=False).ids
        assert default.prompt(problem) + "\n" == text and default.prompt_ids(problem) != exact.prompt_ids(problem)


def test_compat_torl_refuses_the_chat_template_and_unknown_modes(tmp_path):
    path = chat_checkpoint(tmp_path, TEMPLATES["qwen3"])
    with pytest.raises(ValueError, match="pass --prompt-template torl"):
        Tokenizer(path, "chat", compat="torl")
    with pytest.raises(ValueError, match="compat must be one of"):
        Tokenizer(path, compat="torl2")
