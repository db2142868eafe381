"""Seconds per GRPO step: nanotorl against TRL's ``GRPOTrainer`` on the same tiny model, prompts and batch (CPU).

    python -m bench.grpo_vs_trl            # 16 prompts x 8 samples, 96 new tokens (the demo preset's step)
    python -m bench.grpo_vs_trl --quick    # 4 prompts x 8 samples, 32 new tokens
    pip install trl==1.16.0                # the TRL side (tested with transformers 5.24, torch 2.13)

Both sides start from one checkpoint: the demo's Qwen2 config with random weights, written by
``nanotorl.checkpoint.save_model``. One step, on both sides: G responses per prompt at temperature 1 (top-p 1),
exactly L tokens each (no stop ids on ours, ``min_new_tokens = L`` on TRL), one reward function of the completion
text (1 if it contains a "7", else 0), group-normalised advantages, the clipped token-mean loss (TRL's "dapo":
normalised by the tokens of the whole step) with no KL, gradient accumulation over micro-batches of the same
number of sequences, gradient-norm clipping, one AdamW step at a constant learning rate. No tools, fp32.
  ours  nanotorl.generate.Generator (sandbox None) then ``train_step`` from train.py, as train.py's loop does; the
        requests and seeds are those ``rollout`` builds, but rewards come from the shared function (``rollout``
        scores with math-verify, which would time the verifier, not GRPO).
  trl   GRPOTrainer with transformers ``generate`` (no vLLM), no gradient checkpointing (TRL's default is on),
        bf16 off, num_iterations 1 (so no second forward for old log-probs), beta 0 (no reference model).
Time per step: median over the timed steps after warm-up; TRL's from one ``on_step_end`` to the next. Both sides
run in one process on one CPU thread by default (``--threads``: idle-spinning OpenMP threads on a busy machine make
timings erratic).
Mismatches left: on ours eos is an ordinary token, on TRL it is suppressed until L (the same token count either
way); TRL also does its own book-keeping per step (metrics, the data loader), which is part of its step.
"""
import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import save_result
from nanotorl.checkpoint import load_model, save_model
from nanotorl.config import PRESETS
from nanotorl.data import arithmetic_problems
from nanotorl.demo import demo_config, save_demo_tokenizer
from nanotorl.generate import Generator, Request, SamplingParams
from nanotorl.memory import adamw
from nanotorl.metrics import print_table
from nanotorl.model import Qwen2
from nanotorl.rollout import Sample, sample_seed
from nanotorl.tokenizer import Tokenizer
from train import train_step

COLUMNS = ["impl", "prompts", "G", "new", "micro_batch", "accum", "s_per_step", "s_generate", "speedup_vs_trl"]


def shared_reward(text: str) -> float:
    """The reward both sides use: a cheap fixed function of the completion text."""
    return 1.0 if "7" in text else 0.0


def make_checkpoint(path: Path) -> Tokenizer:
    """The demo tokenizer and a randomly initialised demo-config Qwen2, as a Hugging Face checkpoint."""
    save_demo_tokenizer(path)
    tok = Tokenizer(path)
    torch.manual_seed(0)
    save_model(Qwen2(demo_config(tok.vocab_size)).init_weights(), path, tokenizer_dir=path,
               eos_ids=tok.eos_ids)
    return tok


def step_prompts(tok: Tokenizer, n: int) -> list[str]:
    """``n`` distinct arithmetic problems whose ToRL prompts share one token length (no padding anywhere)."""
    by_length = {}
    for p in arithmetic_problems(4 * n + 64, seed=0):
        by_length.setdefault(len(tok.prompt_ids(p.problem)), []).append(p)
    group = max(by_length.values(), key=len)
    if len(group) < n:
        raise ValueError(f"only {len(group)} problems share a prompt length, {n} needed: lower --steps or --prompts")
    return group[:n]


def time_ours(path, tok, problems, cfg, steps: int, warmup: int) -> dict:
    """train.py's step, reward excepted: generate every group, score, then one optimizer step with ``train_step``."""
    device = torch.device("cpu")
    model = load_model(path, dtype=torch.float32)
    optimizer = adamw(model.parameters(), cfg.optim.lr, cfg.optim.weight_decay)
    prompt_len = len(tok.prompt_ids(problems[0].problem))
    ro = cfg.rollout
    gen = Generator(model, tok, None, slots=ro.gen_slots, max_len=prompt_len + ro.max_new_tokens, stop_ids=[])
    sampling = SamplingParams(temperature=ro.temperature, top_p=ro.top_p)
    total, generate = [], []
    for step in range(warmup + steps):
        mine = problems[step * cfg.prompts_per_step:(step + 1) * cfg.prompts_per_step]
        first = step * cfg.prompts_per_step
        t0 = time.perf_counter()
        with torch.no_grad():
            model.eval()
            requests = [Request(tok.prompt_ids(p.problem), max_new_tokens=ro.max_new_tokens, sampling=sampling,
                                seed=sample_seed(cfg.seed, first + i, j), max_tool_calls=ro.max_tool_calls)
                        for i, p in enumerate(mine) for j in range(cfg.grpo.group_size)]
            completions = gen.generate(requests)
        samples = [Sample(mine[k // cfg.grpo.group_size], c, None, False, shared_reward(tok.decode(c.response_ids)))
                   for k, c in enumerate(completions)]
        t1 = time.perf_counter()
        train_step(model, optimizer, samples, cfg, device, world=1)
        if step >= warmup:
            total.append(time.perf_counter() - t0)
            generate.append(t1 - t0)
    return {"s_per_step": statistics.median(total), "s_generate": statistics.median(generate)}


def time_trl(path, tok, problems, cfg, micro: int, steps: int, warmup: int, out_dir) -> dict:
    """The same steps with TRL's GRPOTrainer; raises ImportError when trl is missing."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanotorl.data import torl_prompt

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    def reward_7(completions, **kwargs):
        return [shared_reward(c) for c in completions]

    n, ro, grpo, optim = cfg.prompts_per_step * cfg.grpo.group_size, cfg.rollout, cfg.grpo, cfg.optim
    args = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=n // micro, num_generations=grpo.group_size,
        max_completion_length=ro.max_new_tokens, generation_kwargs={"min_new_tokens": ro.max_new_tokens},
        temperature=ro.temperature, top_p=ro.top_p, top_k=0, beta=0.0, num_iterations=1, loss_type="dapo",
        scale_rewards="group" if grpo.std_normalize else "none", epsilon=grpo.clip_low, epsilon_high=grpo.clip_high,
        learning_rate=optim.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=optim.weight_decay,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=optim.grad_clip, max_steps=warmup + steps,
        shuffle_dataset=False, seed=cfg.seed, logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, log_completions=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # AutoTokenizer would build a Qwen2Tokenizer with its own pre-tokenizer (it drops the demo's spaces)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token=tok.tk.id_to_token(
        tok.eos_id), pad_token=tok.tk.id_to_token(tok.pad_id))
    prompts = [torl_prompt(p.problem) for p in problems]
    if [tokenizer(t, add_special_tokens=False).input_ids for t in prompts] != [tok.encode(t) for t in prompts]:
        raise RuntimeError("TRL's tokenizer gives other prompt ids than ours: the comparison would not be fair")
    gen_times = []
    plain_generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = plain_generate(*a, **kw)
        gen_times.append(time.perf_counter() - t0)
        return out
    model.generate = timed_generate
    data = Dataset.from_dict({"prompt": prompts})
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_7], args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its end-of-run summary is not ours to print
    trainer.train()
    per_step = [b - a for a, b in zip(timer.marks, timer.marks[1:])][warmup:]
    return {"s_per_step": statistics.median(per_step),
            "s_generate": statistics.median(gen_times[warmup:]) if len(gen_times) > warmup else float("nan")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts x 8 samples, 32 new tokens, 2 timed steps")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="responses per prompt (num_generations)")
    parser.add_argument("--new", type=int, default=None, help="tokens per response (max_completion_length)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (0: torch's default)")
    args = parser.parse_args()
    prompts = args.prompts or (4 if args.quick else 16)
    new = args.new or (32 if args.quick else 96)
    steps, warmup = args.steps or (2 if args.quick else 3), 1
    n = prompts * args.group
    micro = args.micro_batch or min(n, 32)
    if n % micro:
        raise SystemExit(f"--micro-batch {micro} must divide the {n} sequences of a step")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        tok = make_checkpoint(path)
        problems = step_prompts(tok, prompts * (warmup + steps))
        prompt_len = len(tok.prompt_ids(problems[0].problem))
        demo = PRESETS["demo"]
        cfg = replace(demo, prompts_per_step=prompts, grpo=replace(demo.grpo, group_size=args.group, kl_coef=0.0),
                      rollout=replace(demo.rollout, max_new_tokens=new, gen_slots=n),
                      optim=replace(demo.optim, micro_batch_tokens=micro * (prompt_len + new)))
        print(f"CPU, {torch.get_num_threads()} thread(s): {prompts} prompts x {args.group} samples, prompt "
              f"{prompt_len} + {new} tokens, micro-batch {micro} sequences, {warmup} warm-up + {steps} timed steps")
        shape = {"prompts": prompts, "G": args.group, "new": new, "micro_batch": micro, "accum": n // micro}
        rows = [{"impl": "nanotorl"} | shape | time_ours(path, tok, problems, cfg, steps, warmup)]
        try:
            import trl
            trl_row = {"impl": f"trl {trl.__version__}"} | shape | time_trl(path, tok, problems, cfg, micro,
                                                                         steps, warmup, Path(tmp) / "trl")
        except ImportError as e:
            print(f"TRL NOT MEASURED: {e}. Install it with `pip install trl==1.16.0`; only nanotorl was timed.")
            trl_row = None
    if trl_row is not None:
        rows.append(trl_row)
        for r in rows:
            r["speedup_vs_trl"] = trl_row["s_per_step"] / r["s_per_step"]
    print_table(rows, COLUMNS)
    save_result("grpo_vs_trl", rows, "_quick" if args.quick else "")


if __name__ == "__main__":
    main()
