"""The generator against naive full-recompute loops, itself one request at a time, and scripted tool scenarios."""
import contextlib
import io
import json
import shutil
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import interpreted, needs_cxx, save_chat_tokenizer, shared_path
from nanotorl.batch import prefill_groups
from nanotorl.checkpoint import load_model, save_model
from nanotorl.compiled_decode import decode_forward
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Generator, Request, SamplingParams
from nanotorl.model import Qwen2, Qwen2Config
from nanotorl.slots import SlotTable
from nanotorl.tokenizer import Tokenizer
from nanotorl.tool import SILENT_MESSAGE, format_observation
from nanotorl.sandbox.result import Result


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_demo_tokenizer(path)
    return Tokenizer(path)


QWEN3 = dict(head_dim=12, qkv_bias=False, qk_norm=True)  # Qwen3's switches, head_dim apart from hidden/heads
# how the decoding rows run: the eager forward over a span of slots, the fixed-shape decode step (a CUDA graph on
# GPU), the compiled CPU forward (nanotorl/compiled_decode.py)
DECODING = {"span": {}, "decode-step": {"cuda_graph": True}, "compiled": {"compile": True}}
DECODINGS = ["span", "decode-step", pytest.param("compiled", marks=needs_cxx)]


def tiny_model(vocab, seed=0, **arch):
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **arch)
    g = torch.Generator().manual_seed(seed)
    model = Qwen2(cfg).init_weights(std=0.3, generator=g).eval()
    with torch.no_grad():  # q/k norm weights away from 1, so that they count
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size)


class Forced(torch.nn.Module):
    """Wraps a model: at position p the logit of ``script[p + 1]`` gets ``bias`` added (the script is the whole
    expected sequence, prompt + response). With a large bias the model writes the script; inserted tool tokens
    sit in the script too but are never sampled. ``model=None`` gives a model that is all bias. Device tensors
    only, no host reads, so that a decode step through it can be captured in a CUDA graph."""

    def __init__(self, script, vocab, bias=1e4, model=None):
        super().__init__()
        self.model = model or tiny_model(vocab)
        self.cfg, self.bias, self.vocab = self.model.cfg, bias, vocab
        self.register_buffer("script", torch.tensor(list(script) + [-1]), persistent=False)
        self.use_model = model is not None

    def forward(self, ids, positions=None, seq_ids=None, cache=None, slots=None):
        h = self.model(ids, positions, seq_ids, cache, slots)
        if isinstance(ids, list):  # groups of rows in one cached forward
            return [self._biased(*group) for group in zip(h, ids, positions)]
        return self._biased(h, ids, positions)

    def _biased(self, h, ids, positions):
        if not self.use_model:
            h = torch.zeros_like(h)
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        target = self.script[(positions + 1).clamp(max=len(self.script) - 1)]  # -1: past the script, no bias
        hit = torch.arange(self.vocab, device=h.device) == target[..., None]  # [B, T, V] (one_hot reads the host)
        return torch.cat([h, hit.to(h.dtype) * self.bias], -1)

    def logits(self, x):
        return self.model.logits(x[..., :self.cfg.hidden_size]) + x[..., self.cfg.hidden_size:]

    def decode(self, ids, positions, keys, values):
        """The compiled decoding forward's contract (nanotorl.compiled_decode): the wrapped model's, biased."""
        h, k, v = decode_forward(self.model, ids, positions, keys, values)
        return self._biased(h[:, None], ids[:, None], positions[:, None])[:, 0], k, v


class FakeSandbox:
    """Runs code with exec in a thread after ``delay`` seconds; ``fail`` makes every run raise."""

    def __init__(self, delay=0.0, fail=False):
        self.calls, self.delay, self.fail = [], delay, fail
        self.pool = ThreadPoolExecutor(4)

    def _run(self, code):
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("sandbox server died")
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(code, {})
            return Result("ok", out.getvalue(), wall_time=self.delay)
        except Exception as e:
            return Result("error", out.getvalue(), exit_code=1, wall_time=self.delay,
                          error_line=f"{type(e).__name__}: {e}")

    def submit(self, code):
        self.calls.append(code)
        return self.pool.submit(self._run, code)


def naive_greedy(model, prompt, max_new, end_ids):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model.logits(model(torch.tensor([ids]))[0, -1]).argmax())
            ids.append(nxt)
            if nxt in end_ids:
                break
    return ids[len(prompt):]


def prompts(tok, n):
    return [tok.encode(f"What is {i * 37 % 101} + {i}?") for i in range(n)]


@pytest.mark.parametrize("decoding", DECODINGS)
@pytest.mark.parametrize("arch", [{}, QWEN3], ids=["qwen2", "qwen3"])
def test_greedy_equals_naive_full_recompute(tok, arch, decoding):
    model = tiny_model(tok.vocab_size, **arch)
    reqs = [Request(p, max_new_tokens=12, sampling=SamplingParams(temperature=0.0)) for p in prompts(tok, 5)]
    outs = Generator(model, tok, slots=3, max_len=64, prefill_chunk=4, **DECODING[decoding]).generate(reqs)
    for r, o in zip(reqs, outs):
        assert o.response_ids == naive_greedy(model, r.prompt_ids, 12, tok.eos_ids)
        assert o.prompt_ids == r.prompt_ids and o.loss_mask == [1] * len(o.response_ids)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    """The demo tokenizer with an instruct model's end ids: <|im_end|> (eos_token) and <|endoftext|>, as
    generation_config.json lists them, plus "!" from config.json."""
    path = tmp_path_factory.mktemp("chat_tok")
    im_end, endoftext = save_chat_tokenizer(path)
    bang = Tokenizer(path).token_to_id("!")
    (path / "config.json").write_text(json.dumps({"eos_token_id": bang}))
    tok = Tokenizer(path)
    assert tok.eos_ids == [im_end, endoftext, bang]
    return tok


@pytest.mark.parametrize("decoding", DECODINGS)
def test_stops_at_each_end_id(chat_tok, decoding):
    """One batch, each response scripted to write a different end id (then more text): each stops right there."""
    tok, prompt = chat_tok, chat_tok.encode("Q: 6 * 7?")
    text = tok.encode("The answer is 42")
    scripts = [prompt + text + [end] + tok.encode(" and more") for end in tok.eos_ids]
    scripts.append(prompt + text + tok.encode(" and more text, no end"))
    for script in scripts:
        new = len(script) - len(prompt)  # the whole scripted response fits
        out = Generator(Forced(script, tok.vocab_size), tok, slots=2, max_len=64, **DECODING[decoding]).generate(
            [Request(prompt, max_new_tokens=new, sampling=SamplingParams(temperature=0.0))] * 2)
        ends = script[len(prompt) + len(text)] in tok.eos_ids
        for o in out:
            assert o.finish_reason == ("eos" if ends else "length")
            assert o.response_ids == script[len(prompt):len(prompt) + len(text) + 1 if ends else len(script)]


def test_batched_sampling_equals_one_at_a_time(model, tok):
    reqs = [Request(p, max_new_tokens=10, seed=7 + i, sampling=SamplingParams(temperature=1.0, top_k=20))
            for i, p in enumerate(prompts(tok, 6))]
    batched = Generator(model, tok, slots=4, max_len=64).generate(reqs)
    alone = [Generator(model, tok, slots=1, max_len=64).generate([r])[0] for r in reqs]
    assert [o.response_ids for o in batched] == [o.response_ids for o in alone]
    assert len({tuple(o.response_ids) for o in batched}) > 1  # really sampling


def test_samples_of_one_prompt_share_its_prefill(model, tok):
    """G samples of each prompt in one batch: one of them is fed the prompt (chunk by chunk), the others copy its
    cache and last hidden state, and each draws exactly what it draws alone, log-probs included. A chunk whose
    tokens so far are the same in several prompts ("What is ...") is fed once too."""
    ps = prompts(tok, 3)
    reqs = [Request(p, max_new_tokens=8, seed=10 * i + j, sampling=SamplingParams(temperature=1.0))
            for i, p in enumerate(ps) for j in range(3)]
    batched = Generator(model, tok, slots=9, max_len=64, prefill_chunk=4).generate(reqs)
    alone = [Generator(model, tok, slots=1, max_len=64, prefill_chunk=4).generate([r])[0] for r in reqs]
    assert [o.response_ids for o in batched] == [o.response_ids for o in alone]
    for b, a in zip(batched, alone):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
    fed_once = sum(len(prefix) - c for c in range(0, max(map(len, ps)), 4)   # each distinct prefix of each chunk
                   for prefix in {tuple(p[:c + 4]) for p in ps if len(p) > c})
    assert sum(o.prefill_tokens for o in batched) == fed_once < sum(map(len, ps))
    assert len({tuple(o.response_ids) for o in batched}) > 3  # the samples of a prompt differ


@pytest.mark.parametrize("longer_first", [False, True], ids=["prefix-first", "longer-first"])
def test_a_prompt_that_ends_where_another_goes_on_is_not_its_twin(model, tok, longer_first):
    """Prompts that agree up to a chunk's end, where one of them ends and the other goes on: the chunk completes
    one and not the other, so neither may take the other's state; each draws what it draws alone."""
    long = prompts(tok, 1)[0] + tok.encode(" Then add 5.")
    short = long[:8]  # ends at the end of the second chunk of 4
    order = [long, short] if longer_first else [short, long]
    reqs = [Request(p, max_new_tokens=6, seed=3 + i, sampling=SamplingParams(temperature=1.0))
            for i, p in enumerate(order + order)]
    batched = Generator(model, tok, slots=4, max_len=64, prefill_chunk=4).generate(reqs)
    alone = [Generator(model, tok, slots=1, max_len=64, prefill_chunk=4).generate([r])[0] for r in reqs]
    assert [o.response_ids for o in batched] == [o.response_ids for o in alone]
    for b, a in zip(batched, alone):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)


class Counting(torch.nn.Module):
    """Wraps a model and records the token count of each group of every cached forward, pads included."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.fed = model, model.cfg, []

    def forward(self, ids, positions=None, seq_ids=None, cache=None, slots=None):
        self.fed.append([i.numel() for i in ids])
        return self.model(ids, positions, seq_ids, cache, slots)

    def logits(self, h):
        return self.model.logits(h)


def test_prefill_rows_of_different_lengths_feed_no_pads_and_draw_what_they_draw_alone(model, tok):
    """Prompts of 3 to 40 tokens prefilled in one forward: rows are grouped by length (a row pads to its group's
    longest only when that wastes at most a quarter of it), so the forward feeds far fewer tokens than every row
    padded to the longest; every request draws what it draws alone, log-probs included."""
    base = tok.encode("What is 12 + 30? Think step by step, then write the answer.")
    lengths = [3, 4, 40, 38, 9, 31, 8, 39]
    reqs = [Request(base[:n], max_new_tokens=5, seed=i, sampling=SamplingParams(temperature=1.0))
            for i, n in enumerate(lengths)]
    counting = Counting(model)
    batched = Generator(counting, tok, slots=len(reqs), max_len=64).generate(reqs)
    alone = [Generator(model, tok, slots=1, max_len=64).generate([r])[0] for r in reqs]
    assert [o.response_ids for o in batched] == [o.response_ids for o in alone]
    for b, a in zip(batched, alone):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
    first = counting.fed[0]  # groups (40, 39, 38, 31), (9, 8), (4, 3), padded to 40, 9 and 4: 186 tokens, not 320
    assert sorted(first) == [8, 18, 160]


@pytest.mark.parametrize("lengths", [[5], [7, 7, 7], [6, 17, 6, 17, 6], [32, 9, 24, 25, 10, 1, 2, 3, 4, 8, 12, 16],
                                     [100, 76, 75, 57, 56]])
def test_prefill_groups_waste_at_most_a_quarter_and_keep_slot_order(tok, lengths):
    """Every prefilling slot is fed once, in exactly one group; a group's rows are in slot order and none is
    padded by more than a quarter of the group's length; a row that fits the group before it joins it."""
    table = SlotTable(len(lengths), 128, torch.zeros(tok.vocab_size, dtype=torch.bool),
                      torch.zeros(tok.vocab_size, dtype=torch.bool), device="cpu")
    slots = []
    for index, n in enumerate(lengths):
        s = types.SimpleNamespace(index=index, n_tokens=n, n_cached=0, request=Request(list(range(1, n + 1))))
        table.tokens[index, :n] = torch.arange(1, n + 1)
        slots.append(s)
    groups = prefill_groups(table, slots, chunk=64)
    seen = [int(i) for g in groups for i in g.slots]
    assert sorted(seen) == list(range(len(lengths)))
    widths = []
    for g in groups:
        fed = [min(lengths[int(i)], 64) for i in g.slots]
        assert g.slots.tolist() == sorted(g.slots.tolist())
        assert g.ids.shape[1] == max(fed) and 4 * min(fed) >= 3 * max(fed)
        for row, i in enumerate(g.slots.tolist()):
            assert g.ids[row, :fed[row]].tolist() == list(range(1, fed[row] + 1))
        assert sorted(g.ready_idx.tolist()) == sorted(i for i in g.slots.tolist() if lengths[i] <= 64)
        widths.append(max(fed))
    assert widths == sorted(widths, reverse=True)
    for longer, shorter in zip(groups, groups[1:]):  # the longest of a group did not fit the group before it
        assert 4 * shorter.ids.shape[1] < 3 * longer.ids.shape[1]


def test_more_requests_than_slots_each_returned_once(model, tok):
    reqs = [Request(p, max_new_tokens=3 + i % 4, seed=i) for i, p in enumerate(prompts(tok, 13))]
    done = []
    outs = Generator(model, tok, slots=3, max_len=64).generate(reqs, progress=done.append)
    assert sum(done) == 13
    assert [o.prompt_ids for o in outs] == [r.prompt_ids for r in reqs]
    assert all(len(o.response_ids) == r.max_new_tokens or o.finish_reason == "eos" for o, r in zip(outs, reqs))


def scripted(tok, before, after, code_output, trigger="fence"):
    """Expected (prompt, full token script, observation ids) for a response that calls the tool once."""
    prompt = tok.encode("Compute 6 * 7.")
    obs_text = ("" if trigger == "output" else "```output\n") + f"{code_output}\n```\n"
    first, obs, second = tok.encode(before), tok.encode(obs_text), tok.encode(after) + [tok.eos_id]
    return prompt, prompt + first + obs + second, obs, len(first), len(second)


def test_code_block_is_run_observation_inserted_masked_and_generation_resumes(tok):
    before, after = "Let me compute.\n```python\nprint(6 * 7)\n```\n", "The answer is \\boxed{42}"
    prompt, script, obs, n1, n2 = scripted(tok, before, after, "42")
    box = FakeSandbox(delay=0.05)
    out = Generator(Forced(script, tok.vocab_size), tok, box, slots=2, max_len=128).generate(
        [Request(prompt, max_new_tokens=100, sampling=SamplingParams(temperature=0.0))])[0]
    assert box.calls == ["print(6 * 7)\n"]
    assert out.response_ids == script[len(prompt):]
    assert out.loss_mask == [1] * n1 + [0] * len(obs) + [1] * n2
    assert [c.observation for c in out.tool_calls] == ["42"] and out.tool_calls[0].status == "ok"
    assert out.finish_reason == "eos"
    # the prompt once, then on resume only the observation and the fence token sampled before the pause
    assert out.prefill_tokens == len(prompt) + len(obs) + 1


def test_sampled_logprobs_match_full_recompute_across_a_tool_call(tok):
    before, after = "x\n```python\nprint(5)\n```\n", "so \\boxed{5}"
    prompt, script, obs, _, _ = scripted(tok, before, after, "5")
    model = Forced(script, tok.vocab_size, bias=12.0, model=tiny_model(tok.vocab_size, seed=3))
    out = Generator(model, tok, FakeSandbox(), slots=2, max_len=128).generate(
        [Request(prompt, max_new_tokens=60, seed=11, sampling=SamplingParams(temperature=1.0))])[0]
    assert len(out.tool_calls) == 1
    full = torch.tensor([prompt + out.response_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(model(full))[0].float(), -1)
    n = len(prompt)
    ref = [float(logp[n + i - 1, t]) for i, t in enumerate(out.response_ids)]
    mask = torch.tensor(out.loss_mask, dtype=torch.bool)
    assert mask.sum() > 10 and (~mask).sum() == len(obs)
    torch.testing.assert_close(torch.tensor(out.logprobs)[mask], torch.tensor(ref)[mask], atol=1e-4, rtol=0)


def test_tool_budget_leaves_further_blocks_as_text(tok):
    block = "```python\nprint(1)\n```\n"
    prompt, script, _, _, _ = scripted(tok, block, block + "done", "1")
    box = FakeSandbox()
    out = Generator(Forced(script, tok.vocab_size), tok, box, max_len=128).generate(
        [Request(prompt, max_new_tokens=100, max_tool_calls=1, sampling=SamplingParams(temperature=0.0))])[0]
    assert len(box.calls) == 1 and len(out.tool_calls) == 1
    assert tok.decode(out.response_ids).endswith(block + "done<|endoftext|>")


def test_torl_output_trigger_runs_when_the_model_writes_output_fence(tok):
    before = "```python\nprint(2 + 3)\n```\n```output\n"
    prompt, script, obs, _, _ = scripted(tok, before, "\\boxed{5}", "5", trigger="output")
    out = Generator(Forced(script, tok.vocab_size), tok, FakeSandbox(), max_len=128, trigger="output").generate(
        [Request(prompt, max_new_tokens=100, sampling=SamplingParams(temperature=0.0))])[0]
    assert tok.decode(out.response_ids) == before + "5\n```\n\\boxed{5}<|endoftext|>"
    assert out.loss_mask.count(0) == len(obs)


@pytest.mark.parametrize("compat", ["none", "torl"])
def test_a_spent_budget_ends_the_response_or_leaves_the_trigger_as_text(tok, compat):
    """One call allowed, two blocks each followed by ```output. ToRL's loop (vllm_rollout_spmd.py, commit cb78cf1,
    lines 269-272) stops on "```output" for C rounds and drops the stop string for the last one: the second
    ```output stays policy text and the model goes on to its answer. Without compat the response ends there."""
    first = "```python\nprint(1)\n```\n```output\n"
    second = "```python\nprint(2)\n```\n```output\n2\n```\nso \\boxed{2}"
    prompt, script, obs, n1, n2 = scripted(tok, first, second, "1", trigger="output")
    box = FakeSandbox()
    out = Generator(Forced(script, tok.vocab_size), tok, box, max_len=128, trigger="output", compat=compat).generate(
        [Request(prompt, max_new_tokens=100, max_tool_calls=1, sampling=SamplingParams(temperature=0.0))])[0]
    assert box.calls == ["print(1)\n"] and [c.observation for c in out.tool_calls] == ["1"]
    if compat == "torl":  # ToRL's text: the model's own second ```output block, then the answer
        assert tok.decode(out.response_ids) == first + "1\n```\n" + second + "<|endoftext|>"
        assert (out.finish_reason, out.loss_mask) == ("eos", [1] * n1 + [0] * len(obs) + [1] * n2)
    else:
        assert tok.decode(out.response_ids) == first + "1\n```\n" + second[:second.index("2\n```")]
        assert out.finish_reason == "tool_budget"


def test_compat_torl_needs_the_output_trigger(tok):
    with pytest.raises(ValueError, match="pass --trigger output"):
        Generator(Forced([0], tok.vocab_size), tok, FakeSandbox(), trigger="fence", compat="torl")


def test_sandbox_failure_and_empty_code_become_error_observations(tok):
    prompt, script, _, _, _ = scripted(tok, "```python\nprint(1)\n```\n", "ok", "SandboxError: sandbox server died")
    out = Generator(Forced(script, tok.vocab_size), tok, FakeSandbox(fail=True), max_len=128).generate(
        [Request(prompt, max_new_tokens=100, sampling=SamplingParams(temperature=0.0))])[0]
    assert out.tool_calls[0].status == "error" and out.finish_reason == "eos"
    assert out.tool_calls[0].observation == "SandboxError: sandbox server died"

    prompt, script, _, _, _ = scripted(tok, "```python\n  \n```\n", "ok", "SyntaxError: empty code block")
    box = FakeSandbox()
    out = Generator(Forced(script, tok.vocab_size), tok, box, max_len=128).generate(
        [Request(prompt, max_new_tokens=100, sampling=SamplingParams(temperature=0.0))])[0]
    assert box.calls == [] and out.tool_calls[0].observation == "SyntaxError: empty code block"
    assert out.response_ids == script[len(prompt):]


def test_unclosed_block_is_not_run(tok):
    prompt = tok.encode("Q")
    script = prompt + tok.encode("```python\nprint(1)\n")
    box = FakeSandbox()
    out = Generator(Forced(script, tok.vocab_size), tok, box, max_len=64).generate(
        [Request(prompt, max_new_tokens=len(script) - len(prompt), sampling=SamplingParams(temperature=0.0))])[0]
    assert box.calls == [] and out.finish_reason == "length"


def test_observation_that_fills_the_budget_finishes_with_length(tok):
    prompt, script, obs, n1, _ = scripted(tok, "```python\nprint(6 * 7)\n```\n", "more", "42")
    out = Generator(Forced(script, tok.vocab_size), tok, FakeSandbox(), max_len=128).generate(
        [Request(prompt, max_new_tokens=n1 + 3, sampling=SamplingParams(temperature=0.0))])[0]
    assert out.finish_reason == "length" and len(out.response_ids) == n1 + 3
    assert out.loss_mask == [1] * n1 + [0] * 3


def test_bad_input_gets_clear_errors(model, tok):
    gen = Generator(model, tok, max_len=16)
    with pytest.raises(ValueError, match="prompt of 20 tokens does not fit the context of 16"):
        gen.generate([Request([1] * 20)])
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate([Request([])])
    gen.close()
    with pytest.raises(RuntimeError, match="closed"):
        gen.generate([Request([1, 2])])


def test_format_observation_follows_torl_and_says_why_it_is_empty():
    assert format_observation("42\n", None, "ok") == "42"
    assert format_observation("partial\n", "NameError: name 'x' is not defined", "error") == \
        "NameError: name 'x' is not defined"
    assert format_observation("", None, "timeout").startswith("TimeoutError")
    assert format_observation(" \n", None, "ok") == SILENT_MESSAGE and "printed nothing" in SILENT_MESSAGE
    assert format_observation("", None, "memory") == "(the code ended with status memory and printed nothing)"
    long = "".join(chr(65 + i % 26) for i in range(300))
    assert format_observation(long, None, "ok") == long[:128] + "..." + long[-128:]
    assert format_observation(long[:255], None, "ok") == long[:255]


def test_fence_split_across_qwen_tokens_is_detected():
    qwen = Tokenizer(shared_path("tokenizers", "qwen2.5"))
    before = "Compute.\n```python\nprint(6*7)\n```\n"
    assert qwen.encode(before)[-2:] == [13874, 3989]  # "``" + "`\n", see ../shared/tokenizers/qwen2.5/README.md
    prompt, script, obs, _, _ = scripted(qwen, before, "\\boxed{42}", "42")
    box = FakeSandbox()
    out = Generator(Forced(script, qwen.vocab_size), qwen, box, max_len=128).generate(
        [Request(prompt, max_new_tokens=60, sampling=SamplingParams(temperature=0.0))])[0]
    assert box.calls == ["print(6*7)\n"] and out.response_ids == script[len(prompt):]


def test_torl_output_trigger_fires_on_qwen_tokens_and_runs_the_last_block():
    """Qwen2.5 ends "```output\n" with the tokens "output" and "\n", neither holding a backtick: the sequence must
    pause right there (the model's own ```output line kept), run the last python block, not the first, and
    never treat the model's later text as an observation. The real ids, not renumbered (tests/test_fences.py)."""
    qwen = Tokenizer(shared_path("tokenizers", "qwen2.5"))
    before = "Try:\n```python\nprint(1)\n```\nBetter:\n```python\nprint(2 + 3)\n```\n```output\n"
    assert [qwen.decode([t]) for t in qwen.encode(before)[-3:]] == ["```", "output", "\n"]
    prompt, script, obs, n1, n2 = scripted(qwen, before, "\\boxed{5}", "5", trigger="output")
    box = FakeSandbox()
    out = Generator(Forced(script, qwen.vocab_size), qwen, box, max_len=128, trigger="output").generate(
        [Request(prompt, max_new_tokens=80, sampling=SamplingParams(temperature=0.0))])[0]
    assert box.calls == ["print(2 + 3)\n"] and out.response_ids == script[len(prompt):]
    assert out.loss_mask == [1] * n1 + [0] * len(obs) + [1] * n2 and qwen.decode(obs) == "5\n```\n"


def test_each_position_draws_fresh_randomness(tok):
    """Uniform logits: every position must draw anew (seeded by the token's position), so a long sample visits
    many tokens; reusing one position's noise would repeat a single token."""
    flat = Forced([], tok.vocab_size, bias=0.0)  # no script, a model that is all zeros: uniform logits
    out = Generator(flat, tok, slots=2, max_len=128, stop_ids=[]).generate(
        [Request(tok.encode("Q"), max_new_tokens=60, seed=5, sampling=SamplingParams(temperature=1.0))])[0]
    assert len(set(out.response_ids)) > 30  # 60 uniform draws over ~105 tokens: about 45 distinct
    expected = -torch.log(torch.tensor(float(tok.vocab_size)))
    torch.testing.assert_close(torch.tensor(out.logprobs), expected.expand(60), atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoding", DECODINGS)
def test_paused_and_free_slots_beside_decoding_ones_change_nothing(tok, decoding, monkeypatch):
    """Requests that start at different times pause for the tool at different steps; the decoding forward then
    carries paused, prefilling and free slots as filler rows (the span of consecutive slots, eager or compiled,
    or every slot in the fixed-shape decode step). Every sequence must come out as when it runs alone."""
    before, after = "Let me compute.\n```python\nprint(6 * 7)\n```\n", "The answer is \\boxed{42}"
    prompt, script, _, _, _ = scripted(tok, before, after, "42")
    model = Forced(script, tok.vocab_size, bias=12.0, model=tiny_model(tok.vocab_size, seed=3))
    reqs = [Request(prompt, max_new_tokens=n, seed=i, sampling=SamplingParams(temperature=1.0))
            for i, n in enumerate([3, 9, 60, 60, 60, 60])]
    fillers = []
    inputs = SlotTable.decode_inputs

    def spy(table, slots, mask):
        fillers.append(len(slots) - int(mask.sum()))
        return inputs(table, slots, mask)

    monkeypatch.setattr(SlotTable, "decode_inputs", spy)
    batched = Generator(model, tok, FakeSandbox(delay=0.03), slots=4, max_len=128,
                        **DECODING[decoding]).generate(reqs)
    assert max(fillers) > 0  # the scenario did put other slots among the decoding ones
    alone = [Generator(model, tok, FakeSandbox(), slots=1, max_len=128).generate([r])[0] for r in reqs]
    assert sum(len(o.tool_calls) for o in batched) >= 3
    for b, a in zip(batched, alone):
        assert b.response_ids == a.response_ids and b.loss_mask == a.loss_mask
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0)


def test_decode_step_on_the_triton_path_equals_the_plain_path(model, tok, triton_interpreter, monkeypatch):
    """The fixed-shape decode step with the Triton decode-attention and sampling kernels (interpreted on CPU):
    the window reads nothing on the host, the kernels take every slot. Same tokens as the plain PyTorch path."""
    reqs = [Request(p, max_new_tokens=6, seed=i, sampling=SamplingParams(temperature=0.0 if i % 2 else 1.0))
            for i, p in enumerate(prompts(tok, 3))]
    monkeypatch.setenv("NANOTORL_KERNELS", "torch")
    plain = Generator(model, tok, slots=2, max_len=64).generate(reqs)
    monkeypatch.delenv("NANOTORL_KERNELS")
    interpreted("nanotorl.kernels.decode_attention")
    interpreted("nanotorl.kernels.sampling")
    fixed = Generator(model, tok, slots=2, max_len=64, cuda_graph=True).generate(reqs)
    for f, p in zip(fixed, plain):
        assert f.response_ids == p.response_ids
        torch.testing.assert_close(torch.tensor(f.logprobs), torch.tensor(p.logprobs), atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the CUDA graph")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_equals_eager_on_gpu(tok, dtype):
    """On a GPU: the captured decode step (Triton attention and sampling inside a CUDA graph) against the eager
    step on the same device, with tool calls pausing slots, more requests than slots and mixed sampling; then
    the eager GPU path against the CPU reference (same tokens wherever the CPU's top token is clear)."""
    before, after = "Let me compute.\n```python\nprint(6 * 7)\n```\n", "The answer is \\boxed{42}"
    prompt, script, _, _, _ = scripted(tok, before, after, "42")
    model = Forced(script, tok.vocab_size, bias=12.0, model=tiny_model(tok.vocab_size, seed=3))
    reqs = [Request(prompt, max_new_tokens=n, seed=i, sampling=SamplingParams(temperature=float(i % 2)))
            for i, n in enumerate([3, 9, 60, 60, 60, 60, 40])]
    runs = {}
    for name, graph in [("graph", True), ("eager", False)]:
        m = Forced(script, tok.vocab_size, bias=12.0, model=tiny_model(tok.vocab_size, seed=3)).to("cuda", dtype)
        runs[name] = Generator(m, tok, FakeSandbox(delay=0.03), slots=4, max_len=128,
                               cuda_graph=graph).generate(reqs)
    for g, e in zip(runs["graph"], runs["eager"]):
        assert g.response_ids == e.response_ids and g.loss_mask == e.loss_mask
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(e.logprobs), atol=1e-3, rtol=0)
    if dtype == torch.float32:
        cpu = Generator(model, tok, FakeSandbox(), slots=4, max_len=128).generate(reqs)
        assert [c.response_ids for c in cpu] == [e.response_ids for e in runs["eager"]]


def padded_checkpoint(tok, path, rows=None, bias=20.0):
    """A random Qwen2.5-shaped checkpoint (tied embedding) whose embedding has ``rows`` rows (default: 2 * D past
    the tokenizer's ids), as every Qwen2.5 and Qwen3 checkpoint has (151,936 rows for 151,665 tokens), in ``path``,
    which holds the tokenizer's files. 2 * D of the extra rows are +-bias e_d: the final hidden state has RMS 1, so
    one of them scores at least ``bias`` at every position, and unmasked they take nearly all of the probability."""
    model = tiny_model(rows or tok.vocab_size + 64)
    with torch.no_grad():
        extra = bias * torch.cat([torch.eye(32), -torch.eye(32)])  # [64, D]
        model.embed_tokens.weight[tok.vocab_size:tok.vocab_size + 64] = extra
    save_model(model, path, tokenizer_dir=path)
    return model


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_ids_past_the_tokenizer_are_never_sampled_and_logprobs_agree(tok, tmp_path, kernels, monkeypatch):
    """Ids the tokenizer has no token for (the padding rows of the embedding) get no logit, in the sampler (the
    PyTorch reference, and the Triton kernel interpreted on CPU) and in the trainer's log-prob alike: 200 sampled
    steps give only real tokens (20 through the interpreted kernel, which is slow), and both log-probs equal
    log_softmax over the real rows only."""
    save_demo_tokenizer(tmp_path)
    unmasked = padded_checkpoint(tok, tmp_path)
    prompt = tok.prompt_ids("1 + 1")
    with torch.no_grad():
        probs = unmasked.logits(unmasked(torch.tensor([prompt])))[0].softmax(-1)
    assert float(probs[:, tok.vocab_size:].sum(-1).min()) > 0.99  # the extra ids would be drawn nearly always
    model = load_model(tmp_path, vocab=tok.vocab_size).eval()
    if kernels == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        interpreted("nanotorl.kernels.decode_attention")
        interpreted("nanotorl.kernels.sampling")
    n, new = (4, 50) if kernels == "torch" else (2, 10)
    reqs = [Request(prompt, max_new_tokens=new, seed=i, sampling=SamplingParams(temperature=1.0)) for i in range(n)]
    outs = Generator(model, tok, FakeSandbox(), slots=n, max_len=len(prompt) + new, stop_ids=[],
                     cuda_graph=kernels == "triton").generate(reqs)
    ids = [t for out in outs for t in out.response_ids]
    assert len(ids) == n * new and max(ids) < tok.vocab_size
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with torch.no_grad():
        for out in outs:
            full = torch.tensor([prompt + out.response_ids])
            h = model(full)[0, len(prompt) - 1:-1]                                   # [T, D]
            real = model.embed_tokens.weight[:tok.vocab_size]                         # [V_tok, D]
            ref = torch.log_softmax(h @ real.T, -1).gather(1, torch.tensor(out.response_ids)[:, None])[:, 0]
            targets = torch.tensor([[-100] * (len(prompt) - 1) + out.response_ids + [-100]])
            trainer = model.token_logprobs(full, targets)[len(prompt) - 1:-1]
            torch.testing.assert_close(torch.tensor(out.logprobs), ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(trainer, ref, atol=1e-4, rtol=0)


def test_the_real_qwen_vocabulary_its_271_padding_ids_are_never_sampled(tmp_path):
    """The issue's case: Qwen2.5's tokenizer (151,665 tokens) and an embedding of 151,936 rows, the model biased
    toward the padding ids; the generator reads every line of 200 sampled tokens for a code fence (where the
    first padding id crashed it) and all of them are real tokens."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(shared_path("tokenizers", "qwen2.5", name), tmp_path / name)
    tok = Tokenizer(tmp_path)
    assert tok.vocab_size == 151665
    padded_checkpoint(tok, tmp_path, rows=151936)
    model = load_model(tmp_path, vocab=tok.vocab_size).eval()
    prompt = tok.prompt_ids("What is 1 + 1?")
    reqs = [Request(prompt, max_new_tokens=50, seed=i, sampling=SamplingParams(temperature=1.0)) for i in range(4)]
    outs = Generator(model, tok, FakeSandbox(), slots=4, max_len=len(prompt) + 50, stop_ids=[]).generate(reqs)
    ids = [t for out in outs for t in out.response_ids]
    assert len(ids) == 200 and max(ids) < 151665


def test_a_tokenizer_larger_than_the_embedding_is_refused(tok, tmp_path):
    save_demo_tokenizer(tmp_path)
    padded_checkpoint(tok, tmp_path)
    with pytest.raises(ValueError, match=f"tokenizer has {tok.vocab_size + 65} ids.*embedding has "
                                         f"{tok.vocab_size + 64} rows"):
        load_model(tmp_path, vocab=tok.vocab_size + 65)


def test_special_tokens_are_read_as_their_text_and_ids_without_a_token_as_no_bytes(chat_tok):
    """Decided: special (added) tokens can be sampled and read as their text (an end id still ends a response);
    an id inside the tokenizer's range that has no token at all reads as no bytes instead of crashing the
    line reader. Ids past the tokenizer's last one are never sampled (the test above)."""
    added = chat_tok.tk.get_added_tokens_decoder()
    assert added and all(chat_tok.token_bytes(i) == t.content.encode() for i, t in added.items())
    assert chat_tok.token_bytes(chat_tok.vocab_size + 5) == b""
