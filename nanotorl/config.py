"""The training configuration: one dataclass, named presets, and CLI overrides generated from its fields.

    python train.py --preset torl-1.5b --model DIR --data train.parquet --lr 2e-6
"""
import argparse
from dataclasses import dataclass, fields, replace


@dataclass
class TrainConfig:
    # what to train
    model: str = ""                 # Hugging Face Qwen2 directory; "" = the demo's base model, built on first use
    data: str = ""                  # JSONL {problem, answer} or ToRL parquet; "" = the demo's synthetic arithmetic
    eval_data: str = ""             # held-out set for validation (the demo uses its held-out arithmetic split)
    out_dir: str = "runs/demo"
    skip_bad_rows: bool = False     # skip (and count) malformed data rows instead of stopping
    # the run
    steps: int = 60
    prompts_per_step: int = 16      # global, over all ranks
    group_size: int = 8             # responses per prompt
    seed: int = 0
    # rollouts
    max_new_tokens: int = 96        # every token after the prompt, tool output included
    max_prompt_tokens: int = 400    # longer prompts are dropped from the training set (and counted)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tool_calls: int = 1         # C in the paper
    trigger: str = "fence"          # 'fence': run a block once closed; 'output': when the model writes ```output
    gen_slots: int = 128            # concurrent sequences per rank
    cuda_graph: bool = False        # decode step as a CUDA graph (GPU; not yet measured on one: see README)
    sandbox_workers: int = 2
    sandbox_timeout: float = 5.0
    code_penalty: float = 0.0       # extra penalty for a failed tool call (the paper's ablation used 0.5)
    # optimisation
    lr: float = 5e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_tokens: int = 4096  # tokens per packed micro-batch (gradient accumulation over them)
    clip_low: float = 0.2
    clip_high: float = 0.2
    std_normalize: bool = True
    aggregation: str = "token"      # 'token' | 'sequence'
    kl_coef: float = 0.0
    skip_uniform_groups: bool = False
    dtype: str = "float32"          # parameter dtype on CPU; on GPU: compute dtype under FSDP2 mixed precision
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    # validation, checkpoints, logging
    eval_every: int = 10
    eval_problems: int = 200
    eval_k: int = 4                 # samples per held-out problem for pass@k (1 = greedy only)
    save_every: int = 20
    keep_checkpoints: int = 2
    tensorboard: bool = False
    wandb_project: str = ""
    # the demo's base model and data
    demo_base_dir: str = ""         # "" = the committed nanotorl/demo_base (rebuilt there if deleted)
    demo_train_problems: int = 4000


PRESETS = {
    "demo": TrainConfig(),
    # ToRL (arXiv 2503.23383) on Qwen2.5-Math: 128 prompts x 16 samples, lr 1e-6, no KL, T=1, top-p 1,
    # responses up to 3072 tokens, one tool call per response.
    "torl-1.5b": TrainConfig(out_dir="runs/torl-1.5b", steps=500, prompts_per_step=128, group_size=16,
                             max_new_tokens=3072, max_prompt_tokens=400, lr=1e-6, weight_decay=0.01,
                             micro_batch_tokens=16384, dtype="bfloat16", activation_checkpointing=True,
                             gen_slots=256, sandbox_workers=16, sandbox_timeout=10.0, eval_every=20,
                             eval_problems=500, eval_k=16, save_every=20),
    "torl-7b": TrainConfig(out_dir="runs/torl-7b", steps=500, prompts_per_step=128, group_size=16,
                           max_new_tokens=3072, max_prompt_tokens=400, lr=1e-6, weight_decay=0.01,
                           micro_batch_tokens=8192, dtype="bfloat16", activation_checkpointing=True,
                           gen_slots=128, sandbox_workers=16, sandbox_timeout=10.0, eval_every=20,
                           eval_problems=500, eval_k=16, save_every=20),
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv=None) -> TrainConfig:
    """``--preset NAME`` then ``--field value`` overrides for any field of :class:`TrainConfig`."""
    parser = argparse.ArgumentParser(description="ToRL training (GRPO with a Python tool)")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    for f in fields(TrainConfig):
        kind = _bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(
            f.type if isinstance(f.type, str) else f.type.__name__, str)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None)
    args = vars(parser.parse_args(argv))
    preset = PRESETS[args.pop("preset")]
    return replace(preset, **{k: v for k, v in args.items() if v is not None})
