"""The built-in demo: a tiny Qwen2 "base model" for synthetic arithmetic, made on the spot.

The demo must show ToRL's effect on 2 CPU cores with nothing downloaded, so it makes its own base model:
a character-level tokenizer (plus a few whole-phrase tokens so the ToRL prompt stays short), and a short
supervised run on arithmetic traces in the ToRL format. Most traces answer directly (a tiny model guesses
large products badly); a minority write a ```python block and copy its output into \\boxed{}. GRPO then
rewards whatever gets the answer right, and the policy learns to call the tool.
"""
import json
import math
import os
import random
import shutil
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from nanotorl.checkpoint import save_model
from nanotorl.data import TORL_TEMPLATE, Problem, arithmetic_problems
from nanotorl.grpo import micro_batches, policy_sequence
from nanotorl.model import Qwen2, Qwen2Config
from nanotorl.tokenizer import Tokenizer

EOS = "<|endoftext|>"
BASE_DIR = Path(__file__).resolve().parent / "demo_base"  # the committed base model
# Whole-phrase tokens: the two halves of the ToRL template around the problem, and the fences.
PHRASES = (TORL_TEMPLATE.split("{problem}")[0], TORL_TEMPLATE.split("{problem}")[1],
           "```python\n", "```output\n", "```\n", "print(", "\\boxed{", "The answer is ")


def demo_tokenizer() -> HFTokenizer:
    """Characters (printable ASCII and newline) as tokens, with :data:`PHRASES` as added whole tokens.

    Digits are single tokens, which a tiny model needs to learn arithmetic; decode(encode(s)) == s.
    """
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {EOS: 0} | {c: i + 1 for i, c in enumerate(chars)}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token=EOS))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens([AddedToken(EOS, special=True)])
    tk.add_tokens([AddedToken(p, normalized=False) for p in PHRASES])
    return tk


def save_demo_tokenizer(path) -> None:
    """Write tokenizer.json and tokenizer_config.json (eos = pad = <|endoftext|>) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    demo_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS}))


def demo_config(vocab_size: int) -> Qwen2Config:
    """The demo's tiny Qwen2: about 0.8M parameters, the same code path as the 7B."""
    return Qwen2Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=10000.0, tie_word_embeddings=True)


def trace(problem: Problem, use_tool: bool) -> tuple[str, str, str]:
    """A response in the ToRL format as (policy text, tool output, policy text); the direct form has neither
    code nor output. The answer in the trace is always right: the tiny model's own errors on large numbers are
    what the tool fixes."""
    answer = f"The answer is \\boxed{{{problem.answer}}}"
    if not use_tool:
        return answer, "", ""
    expr = problem.problem.removeprefix("What is ").removesuffix("?")
    return f"```python\nprint({expr})\n```\n", f"```output\n{problem.answer}\n```\n", answer


def sft_sequences(tok: Tokenizer, problems: list[Problem], tool_fraction: float, seed: int) -> list[dict]:
    """Training sequences (prompt + trace + eos) for :func:`nanotorl.grpo.micro_batches`, laid out by
    :func:`nanotorl.grpo.policy_sequence`: the loss covers the response but not the tool output, as in RL."""
    rng = random.Random(seed)
    seqs = []
    for p in problems:
        code, output, answer = (tok.encode(part) for part in trace(p, rng.random() < tool_fraction))
        response = code + output + answer + [tok.eos_id]
        mask = [1] * len(code) + [0] * len(output) + [1] * (len(answer) + 1)
        seq = policy_sequence(tok.prompt_ids(p.problem), response, mask, [0.0] * len(response), 0.0)
        seqs.append({k: seq[k] for k in ("input_ids", "targets", "weight")})
    return seqs


# (steps, fraction of traces that use the tool): first the format and copying numbers into code and out of the
# output (a small transformer needs a couple of thousand steps before it copies at all), then the mix that
# makes the "base model": mostly direct answers, so tool use is rare before RL.
PHASES = ((3000, 1.0), (1500, 0.2))


def _schedule(tok, problems, phases, batch_tokens: int, seed: int) -> list[dict]:
    """The micro-batches of every step, phase after phase, each phase's batches reshuffled every epoch
    (micro_batches groups sequences by length, so unshuffled batches would come shortest first)."""
    schedule = []
    for n, (steps, tool_fraction) in enumerate(phases):
        batches = micro_batches(sft_sequences(tok, problems, tool_fraction, seed + n), batch_tokens)
        g = torch.Generator().manual_seed(seed + n)
        while len(schedule) < sum(s for s, _ in phases[:n + 1]):
            schedule += [batches[int(i)] for i in torch.randperm(len(batches), generator=g)]
        del schedule[sum(s for s, _ in phases[:n + 1]):]
    return schedule


def build_base_model(path, phases=PHASES, batch_tokens: int = 1024, lr: float = 1e-3, n_problems: int = 20000,
                     seed: int = 1234, log=print) -> Path:
    """Make the demo's "base model" by a short supervised run and save it as a Hugging Face checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_demo_tokenizer(tmp)
    tok = Tokenizer(tmp)
    torch.manual_seed(seed)
    model = Qwen2(demo_config(tok.vocab_size)).init_weights()
    schedule = _schedule(tok, arithmetic_problems(n_problems, seed, "train"), phases, batch_tokens, seed)
    steps = len(schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.55 + 0.45 * math.cos(math.pi * s / steps)))
    model.train()
    bar = tqdm(schedule, desc="demo base model (supervised)", leave=False)
    for mb in bar:
        logp = model.token_logprobs(mb["input_ids"], mb["targets"])
        loss = -(logp * mb["weight"].flatten()).sum() / mb["weight"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    log(f"demo base model: {steps} supervised steps, final loss {loss.item():.3f}")
    save_model(model, tmp, tokenizer_dir=tmp, eos_ids=tok.eos_ids)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Rebuild the demo's base model (the committed one was made "
                                                 "with the defaults: python -m nanotorl.demo)")
    parser.add_argument("--out", default=str(BASE_DIR))
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    build_base_model(args.out, seed=args.seed)
