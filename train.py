"""ToRL training: GRPO with a Python tool, started with torchrun.

    torchrun --nproc_per_node=2 train.py                       # the built-in CPU demo (default preset)
    torchrun --nproc_per_node=8 train.py --preset torl-1.5b --model Qwen2.5-Math-1.5B --data train.parquet

One step, top to bottom (each line a call into one module):
    problems  -> rollout (nanotorl.generate + sandbox)  -> rewards (nanotorl.reward)
              -> advantages (nanotorl.grpo.group_advantages) -> loss (nanotorl.grpo.policy_loss) -> AdamW step
Every rank generates for its share of the step's problems with the model that trains (FSDP2, unsharded while
generating), checkpoints are Hugging Face directories plus the optimizer, and a restarted run resumes from
the newest complete checkpoint in ``out_dir``.
"""
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from nanotorl import dist
from nanotorl.checkpoint import latest_checkpoint, load_model, resume, save_checkpoint
from nanotorl.config import TrainConfig, parse_args
from nanotorl.data import arithmetic_problems, drop_duplicates, load_problems, repeats_line
from nanotorl.demo import BASE_DIR, build_base_model
from nanotorl.generate import Generator, SamplingParams
from nanotorl.grpo import group_advantages, micro_batches, policy_loss, policy_sequence, uniform_groups
from nanotorl.metrics import pass_at_k, source_mean
from nanotorl.prompt import parse_template_vars
from nanotorl.rollout import finish_stats, groups, rollout, rollout_stats
from nanotorl.tokenizer import Tokenizer
from sandbox import SandboxPool


def load_data(cfg: TrainConfig):
    """(train problems, held-out problems): the demo's synthetic arithmetic, or files (held-out repeats dropped)."""
    if not cfg.inputs.data:
        return (arithmetic_problems(cfg.inputs.demo_train_problems, cfg.seed, "train"),
                arithmetic_problems(cfg.log.eval_problems, cfg.seed, "heldout"))
    train = load_problems(cfg.inputs.data, skip_bad=cfg.inputs.skip_bad_rows)
    heldout = load_problems(cfg.inputs.eval_data, skip_bad=cfg.inputs.skip_bad_rows) if cfg.inputs.eval_data else []
    for name, loaded in ((cfg.inputs.data, train), (cfg.inputs.eval_data, heldout)):
        if getattr(loaded, "skipped", None):
            tqdm.write(f"{name}: skipped {len(loaded.skipped)} malformed rows, e.g. {loaded.skipped[0]}")
    if line := repeats_line(cfg.inputs.eval_data, heldout):
        tqdm.write(line)
    return train, drop_duplicates(heldout)[:cfg.log.eval_problems]


def step_problems(problems, step: int, per_step: int, seed: int):
    """The problems of ``step``: a fresh seeded permutation every epoch, so a resumed run sees the same ones."""
    out, start = [], step * per_step
    for k in range(start, start + per_step):
        epoch, i = divmod(k, len(problems))
        order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(problems[int(order[i])])
    return out, start


def train_on(model, optimizer, samples, cfg: TrainConfig, device, world: int) -> dict:
    """One optimizer step on this rank's samples (groups complete on every rank); returns summed statistics."""
    grpo = cfg.grpo
    rewards = torch.tensor([s.reward for s in samples])
    adv = group_advantages(rewards, cfg.grpo.group_size, grpo.std_normalize)
    keep = (~uniform_groups(rewards, cfg.grpo.group_size) if grpo.skip_uniform_groups
            else torch.ones(len(samples), dtype=bool))
    seqs = [policy_sequence(s.completion.prompt_ids, s.completion.response_ids, s.completion.loss_mask,
                            s.completion.logprobs, float(a), grpo.aggregation)
            for s, a, k in zip(samples, adv.tolist(), keep.tolist()) if k]
    local = {"tokens": sum(sum(m > 0 for m in s["weight"]) for s in seqs), "sequences": len(seqs)}
    total = dist.all_sum(local, device)
    normalizer = total["tokens"] if grpo.aggregation == "token" else total["sequences"]
    batches = micro_batches(seqs, cfg.optim.micro_batch_tokens)
    # FSDP needs the same number of passes on every rank: a rank that runs out makes passes with zero weight
    n_batches = int(dist.all_max(len(batches), device))
    batches += micro_batches([policy_sequence([0], [0], [0], [0.0], 0.0)], 1) * (n_batches - len(batches))
    stats = {"clipped": 0.0, "entropy": 0.0, "gap_sum": 0.0, "kl": 0.0, "loss": 0.0}
    gap_max = 0.0
    model.train()
    for batch in batches:
        mb = {k: v.to(device) for k, v in batch.items()}
        logp, entropy = model.token_logprobs(mb["input_ids"], mb["targets"], temperature=cfg.rollout.temperature,
                                             return_entropy=True)
        old, weight = mb["old_logp"].flatten(), mb["weight"].flatten()
        loss, st = policy_loss(logp, old, mb["advantage"].flatten(), weight, grpo, max(normalizer, 1.0))
        (loss * world).backward()  # FSDP averages gradients over ranks; the normalizer is already global
        on = weight > 0
        gap = (logp.detach() - old).abs()[on]
        stats["clipped"] += st["clipped"]
        stats["kl"] += st.get("kl", 0.0)
        stats["entropy"] += float(entropy.detach()[on].sum())
        stats["gap_sum"] += float(gap.sum())
        stats["loss"] += float(loss.detach())
        gap_max = max(gap_max, float(gap.max()) if gap.numel() else 0.0)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stats = dist.all_sum(stats | {"tokens": local["tokens"]}, device)
    n = max(stats["tokens"], 1)
    return {"entropy": stats["entropy"] / n, "clip_fraction": stats["clipped"] / n,
            "kl": stats["kl"] / n, "loss": stats["loss"], "grad_norm": float(grad_norm),
            "logprob_gap_mean": stats["gap_sum"] / n, "logprob_gap_max": dist.all_max(gap_max, device),
            "trained_tokens": int(stats["tokens"])}


def eval_sums(greedy, sampled, k: int) -> dict:
    """Sums over some held-out problems, with the same keys on every rank: problems, greedy responses right and
    calling the tool, and (k > 1) pass@1..k summed over the problems; ``sampled`` holds k samples per problem, in
    a row."""
    sums = {key: rollout_stats(greedy)[key] for key in ("n", "correct", "with_tool")}
    rows = [[s.correct for s in sampled[i:i + k]] for i in range(0, len(sampled), k)]
    return sums | {f"pass@{j}": sum(pass_at_k(k, sum(row), j) for row in rows) for j in range(1, k + 1) if k > 1}


def eval_means(sums: dict) -> dict:
    """The validation metrics from :func:`eval_sums` added up over the ranks."""
    n = max(sums["n"], 1)
    return {"eval_accuracy": sums["correct"] / n, "eval_tool_fraction": sums["with_tool"] / n} | {
        f"eval_{key}": v / n for key, v in sums.items() if key.startswith("pass@")}


def evaluate(model, generator, heldout, cfg: TrainConfig, rank, world, device) -> dict:
    """Greedy accuracy and tool use, and unbiased pass@k, on the held-out set (each rank its share, summed over
    ranks); with --eval-data of several sources, the same per source ("eval_accuracy/aime24") and their unweighted
    mean ("eval_accuracy/average"), as ToRL's validation logs them."""
    mine, first = dist.shard_of(heldout, rank, world)
    budget = {"max_new_tokens": cfg.rollout.max_new_tokens, "max_tool_calls": cfg.rollout.max_tool_calls}
    k = cfg.log.eval_k
    with dist.gathered(model), torch.no_grad():
        model.eval()
        greedy = rollout(generator, groups(mine, 1, SamplingParams(temperature=0.0), first),
                         seed=cfg.seed, **budget) if mine else []
        sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
        sampled = rollout(generator, groups(mine, k, sampling, first),
                          seed=cfg.seed + 1, **budget) if mine and k > 1 else []
    sources = list(dict.fromkeys(p.source for p in heldout)) if cfg.inputs.eval_data else []
    sources = sources if len(sources) > 1 else []
    parts = {"": (greedy, sampled)} | {s: ([x for x in greedy if x.problem.source == s],
                                           [x for x in sampled if x.problem.source == s]) for s in sources}
    local = {part: eval_sums(*samples, k) for part, samples in parts.items()}
    total = dist.all_sum({(part, key): v for part, sums in local.items() for key, v in sums.items()}, device)
    means = {part: eval_means({key: total[(part, key)] for key in sums}) for part, sums in local.items()}
    per_source = {f"{key}/{s}": v for s in sources for key, v in means[s].items()}
    average = source_mean([means[s] for s in sources]) if sources else {}
    return means[""] | per_source | {f"{key}/average": v for key, v in average.items()}


# ------------------------------------------------------------------------------------------------ logging


class Log:
    """Rank 0 writes: a console line and a tqdm bar per step, metrics.jsonl, and optionally TensorBoard/wandb."""

    def __init__(self, cfg: TrainConfig, rank: int, start: int):
        self.on = rank == 0
        self.file = Path(cfg.log.out_dir) / "metrics.jsonl"
        self.tb = self.wandb = self.bar = None
        if not self.on:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        if self.file.exists():  # drop what a crashed run logged after its last checkpoint
            keep = [line for line in self.file.read_text().splitlines() if json.loads(line)["step"] <= start]
            self.file.write_text("".join(line + "\n" for line in keep))
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(Path(cfg.log.out_dir) / "tensorboard")
        if cfg.log.wandb_project:
            import wandb
            self.wandb = wandb.init(project=cfg.log.wandb_project, config=asdict(cfg), resume="allow")
        self.bar = tqdm(total=cfg.steps, initial=start, desc="ToRL", dynamic_ncols=True)

    def __call__(self, record: dict):
        if not self.on:
            return
        with self.file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        keys = ("reward", "accuracy", "tool_fraction", "calls_ok_fraction", "response_length", "eval_accuracy",
                "eval_tool_fraction", "entropy", "logprob_gap_max", "tokens_per_s")
        line = " ".join(f"{k}={record[k]:.3g}" for k in keys if record.get(k) is not None)
        if self.bar is not None and record["step"] > 0:
            self.bar.update(record["step"] - self.bar.n)
        tqdm.write(f"step {record['step']:4d} | {line}")
        for k, v in record.items():
            if self.tb is not None and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# --------------------------------------------------------------------------------------------------- main


def load_policy(cfg: TrainConfig, rank: int, world: int, device):
    """(model, optimizer, tokenizer, first step): the newest checkpoint in ``out_dir`` if there is one (resumed),
    else ``--model``, else the demo's base model (built on first use); the model FSDP2-sharded over the ranks."""
    ckpt = latest_checkpoint(cfg.log.out_dir)
    base = Path(cfg.inputs.model or cfg.inputs.demo_base_dir or BASE_DIR)
    if ckpt is None and not cfg.inputs.model:
        if rank == 0 and not (base / "config.json").is_file():
            build_base_model(base, log=tqdm.write)
        dist.barrier()
    model_dir = ckpt or base
    tok = Tokenizer(model_dir, cfg.inputs.prompt_template, parse_template_vars(cfg.inputs.template_vars))
    cuda = device.type == "cuda"
    dtype = getattr(torch, cfg.optim.dtype)
    model = load_model(model_dir, dtype=torch.float32 if cuda else dtype, device=device)
    model.activation_checkpointing = cfg.optim.activation_checkpointing
    model = dist.shard(model, param_dtype=dtype if cuda else None, cpu_offload=cfg.optim.cpu_offload)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=(0.9, 0.999))
    start = resume(model, optimizer, ckpt, rank, world) if ckpt else 0
    if rank == 0:
        tqdm.write(f"{'resuming ' + str(ckpt) if ckpt else 'starting from ' + str(model_dir)} | {world} process(es) "
                   f"on {device.type} | out_dir {cfg.log.out_dir}")
    return model, optimizer, tok, start


def fitting_problems(cfg: TrainConfig, tok: Tokenizer, rank: int):
    """(train, held-out) problems whose prompts fit ``max_prompt_tokens`` (the training ones dropped are counted)."""
    train, heldout = load_data(cfg)
    limit = cfg.rollout.max_prompt_tokens
    fits = [p for p in train if len(tok.prompt_ids(p.problem)) <= limit]
    if rank == 0 and len(fits) < len(train):
        tqdm.write(f"dropped {len(train) - len(fits)} training problems longer than {limit} tokens")
    if not fits:
        raise ValueError(f"no training problem fits max_prompt_tokens={limit}")
    return fits, [p for p in heldout if len(tok.prompt_ids(p.problem)) <= limit]


def main(argv=None):
    cfg = parse_args(argv)
    rank, world, device = dist.setup()
    if cfg.prompts_per_step % world:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the {world} processes")
    torch.manual_seed(cfg.seed + rank)
    model, optimizer, tok, start = load_policy(cfg, rank, world, device)
    fits, heldout = fitting_problems(cfg, tok, rank)
    if rank == 0:
        tqdm.write(f"prompt of the first problem ({cfg.inputs.prompt_template}):\n{tok.prompt(fits[0].problem)}")
    ro = cfg.rollout
    sampling = SamplingParams(temperature=ro.temperature, top_p=ro.top_p)
    log = Log(cfg, rank, start)
    with SandboxPool(workers=ro.sandbox_workers, wall_time=ro.sandbox_timeout, cpu_time=ro.sandbox_timeout) as box:
        gen = Generator(model, tok, box, slots=ro.gen_slots, max_len=ro.max_prompt_tokens + ro.max_new_tokens,
                        trigger=ro.trigger, cuda_graph=ro.cuda_graph)
        if start == 0 and heldout and cfg.log.eval_every:
            log({"step": 0} | evaluate(model, gen, heldout, cfg, rank, world, device))
        for step in range(start, cfg.steps):
            t0, wait0 = time.perf_counter(), gen.stats["tool_wait_s"]
            problems, first = step_problems(fits, step, cfg.prompts_per_step, cfg.seed)
            mine, offset = dist.shard_of(problems, rank, world)
            with dist.gathered(model), torch.no_grad():
                model.eval()
                samples = rollout(gen, groups(mine, cfg.grpo.group_size, sampling, first + offset),
                                  max_new_tokens=ro.max_new_tokens, max_tool_calls=ro.max_tool_calls, seed=cfg.seed,
                                  code_penalty=ro.code_penalty)
            t1 = time.perf_counter()
            record = {"step": step + 1} | train_on(model, optimizer, samples, cfg, device, world)
            t2 = time.perf_counter()
            sums = dist.all_sum(rollout_stats(samples) | {"tool_wait_s": gen.stats["tool_wait_s"] - wait0}, device)
            record |= finish_stats(sums)
            record |= {"time_generate_s": t1 - t0, "time_sandbox_wait_s": sums["tool_wait_s"] / world,
                       "time_train_s": t2 - t1, "tokens_per_s": sums["response_tokens"] / (t2 - t0)}
            if cfg.log.eval_every and heldout and ((step + 1) % cfg.log.eval_every == 0 or step + 1 == cfg.steps):
                record |= evaluate(model, gen, heldout, cfg, rank, world, device)
            log(record)
            if (step + 1) % cfg.log.save_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(model, optimizer, tok, cfg.log.out_dir, step + 1, asdict(cfg),
                                cfg.log.keep_checkpoints, rank, world)
    log.close()
    if rank == 0:
        from nanotorl.plot import plot_metrics
        png = plot_metrics(Path(cfg.log.out_dir) / "metrics.jsonl", Path(cfg.log.out_dir) / "curves.png")
        tqdm.write(f"done: curves in {png}, weights in {latest_checkpoint(cfg.log.out_dir)}")
    dist.teardown()


if __name__ == "__main__":
    main()
