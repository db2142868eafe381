"""The training configuration: one dataclass per concern, presets as named instances, flags made from the fields.

    python train.py --preset torl-1.5b --model DIR --data train.parquet --lr 2e-6 --clip-high 0.28

:class:`TrainConfig` holds the run's own numbers (steps, prompts per step, seed) and one dataclass per concern:
``inputs`` (:class:`InputsConfig`: the base model and the problems), ``rollout`` (:class:`RolloutConfig`:
generation and the tool), ``grpo`` (:class:`nanotorl.grpo.GRPOConfig`: groups, advantages and the loss),
``optim`` (:class:`OptimConfig`: the optimizer, precision and memory) and ``log`` (:class:`LogConfig`:
validation, checkpoints and logs).

Flags stay flat: every field of every nested dataclass is one flag named after the field (``clip_high`` ->
``--clip-high``, not ``--grpo.clip-high``), so commands read the same whatever concern a field belongs to, and
field names are unique across the whole tree (tests/test_config.py checks it, and that every field has its flag).
A flag overrides its field on top of the ``--preset``; booleans take true/false (also 1/0, yes/no, on/off), and a
boolean flag alone means true (``--skip-bad-rows``). A value of the wrong type is refused by the parser (one
``error:`` line, exit status 2: :class:`nanotorl.cli.ArgumentParser`), a value out of range by the dataclass's own
check (a ValueError that names the flag).
"""
from dataclasses import dataclass, field, fields, is_dataclass, replace

from nanotorl.cli import ArgumentParser, parse_bool
from nanotorl.grpo import GRPOConfig


@dataclass
class InputsConfig:
    model: str = ""                 # Hugging Face Qwen2/Qwen3 directory; "" = the demo's base model, built on first use
    data: str = ""                  # JSONL {problem, answer} or ToRL parquet; "" = the demo's synthetic arithmetic
    eval_data: str = ""             # held-out set for validation (the demo uses its held-out arithmetic split)
    skip_bad_rows: bool = False     # skip (and count) malformed data rows instead of stopping
    prompt_template: str = "torl"   # 'torl': the paper's base-model prompt; 'chat': the checkpoint's chat template
    template_vars: str = ""         # JSON object for the chat template, e.g. '{"enable_thinking": false}'
    demo_base_dir: str = ""         # "" = the committed nanotorl/demo_base (rebuilt there if deleted)
    demo_train_problems: int = 4000


@dataclass
class RolloutConfig:
    max_new_tokens: int = 96        # every token after the prompt, tool output included
    max_prompt_tokens: int = 400    # longer prompts are dropped from the training set (and counted)
    temperature: float = 1.0        # also the temperature of the trainer's log-probs
    top_p: float = 1.0
    max_tool_calls: int = 1         # C in the paper
    trigger: str = "fence"          # 'fence': run a block once closed; 'output': when the model writes ```output
    gen_slots: int = 128            # concurrent sequences per rank
    cuda_graph: bool = False        # decode step as a CUDA graph (GPU; not yet measured on one: see README)
    sandbox_workers: int = 2
    sandbox_timeout: float = 5.0
    code_penalty: float = 0.0       # extra penalty for a failed tool call (the paper's ablation used 0.5)
    tool_failure_limit: float = 0.05  # stop when more of a step's calls than this fail in the sandbox itself

    def __post_init__(self):
        if not 0.0 <= self.tool_failure_limit <= 1.0:
            raise ValueError(f"--tool-failure-limit must be a fraction of the calls, from 0 (stop on the first "
                             f"sandbox failure) to 1 (never stop), got {self.tool_failure_limit}")
        if self.max_tool_calls < 0:
            raise ValueError(f"--max-tool-calls must be 0 (no tool) or more, got {self.max_tool_calls}")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_tokens: int = 4096  # tokens per packed micro-batch (gradient accumulation over them)
    pack_rows: bool = False         # several responses per row (nanotorl/attention.py keeps them apart); else one each
    dtype: str = "float32"          # parameter dtype on CPU; on GPU: compute dtype under FSDP2 mixed precision
    activation_checkpointing: bool = False
    cpu_offload: bool = False


@dataclass
class LogConfig:
    out_dir: str = "runs/demo"      # metrics.jsonl, curves.png, checkpoints/ (a rerun resumes from there)
    eval_every: int = 10
    eval_problems: int = 200
    eval_k: int = 4                 # samples per held-out problem for pass@k (1 = greedy only)
    log_samples_every: int = 0      # steps between training responses kept in samples.jsonl (>= 0; 0: --eval-every)
    log_samples: int = 24           # training responses kept per such step (>= 0): best, worst, one random per group
    log_eval_samples: int = 32      # held-out greedy responses kept per validation (>= 0): the first N problems
    save_every: int = 20
    keep_checkpoints: int = 2
    tensorboard: bool = False
    wandb_project: str = ""
    debug: bool = False             # show the traceback of an error (else one "error: ..." line, nanotorl.cli)


@dataclass
class TrainConfig:
    steps: int = 60
    prompts_per_step: int = 16      # global, over all ranks (each gets grpo.group_size responses)
    seed: int = 0
    inputs: InputsConfig = field(default_factory=InputsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)


def torl_recipe(size: str, gen_slots: int, micro_batch_tokens: int) -> TrainConfig:
    """ToRL (arXiv 2503.23383) on Qwen2.5-Math-``size``: 128 prompts x 16 samples, lr 1e-6, no KL, T=1, top-p 1,
    responses up to 3072 tokens, one tool call per response; the sizes differ only in what fits in memory."""
    return TrainConfig(
        steps=500, prompts_per_step=128,
        rollout=RolloutConfig(max_new_tokens=3072, max_prompt_tokens=400, gen_slots=gen_slots, sandbox_workers=16,
                              sandbox_timeout=10.0),
        grpo=GRPOConfig(group_size=16),
        optim=OptimConfig(lr=1e-6, weight_decay=0.01, micro_batch_tokens=micro_batch_tokens, pack_rows=True,
                          dtype="bfloat16", activation_checkpointing=True),
        log=LogConfig(out_dir=f"runs/torl-{size}", eval_every=20, eval_problems=500, eval_k=16, save_every=20))


PRESETS = {
    "demo": TrainConfig(),
    "torl-1.5b": torl_recipe("1.5b", gen_slots=256, micro_batch_tokens=16384),
    "torl-7b": torl_recipe("7b", gen_slots=128, micro_batch_tokens=8192),
}


def flag_fields(cfg=None, path: tuple = ()) -> dict:
    """{field name: (path of attribute names from the root, dataclass field)} for every leaf field of ``cfg``
    (default: a :class:`TrainConfig`), e.g. ``"clip_high": (("grpo", "clip_high"), Field(...))``."""
    cfg = TrainConfig() if cfg is None else cfg
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        leaves = flag_fields(value, path + (f.name,)) if is_dataclass(value) else {f.name: (path + (f.name,), f)}
        for name, (where, _) in leaves.items():
            if name in out:
                raise ValueError(f"config field {name!r} is both {'.'.join(out[name][0])} and {'.'.join(where)}: "
                                 f"flags are flat (--{name.replace('_', '-')}), so rename one of them")
        out |= leaves
    return out


def with_value(cfg, path: tuple, value):
    """A copy of ``cfg`` with the field at ``path`` (e.g. ``("grpo", "clip_high")``) set to ``value``."""
    if len(path) == 1:
        return replace(cfg, **{path[0]: value})
    return replace(cfg, **{path[0]: with_value(getattr(cfg, path[0]), path[1:], value)})


def parse_args(argv=None) -> TrainConfig:
    """``--preset NAME`` then ``--field value`` overrides for any field of the config tree (module docstring)."""
    parser = ArgumentParser(description="ToRL training (GRPO with a Python tool)")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    leaves = flag_fields()
    for name, (_, f) in leaves.items():
        flag = "--" + name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=name, type=parse_bool, nargs="?", const=True, default=None)
            continue
        kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        parser.add_argument(flag, dest=name, type=kind, default=None)
    args = vars(parser.parse_args(argv))
    cfg = PRESETS[args.pop("preset")]
    for name, value in args.items():
        if value is not None:
            cfg = with_value(cfg, leaves[name][0], value)
    return cfg
