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
boolean flag alone means true (``--skip-bad-rows``). Each field is declared with :func:`nanotorl.flags.option`: its
default, its one-line help (``--help`` shows it with the default and unit) and the values it takes, all beside the
field. A value of the wrong type is refused by the parser (one ``error:`` line, exit status 2:
:class:`nanotorl.cli.ArgumentParser`), a value out of range by the dataclass itself when it is made (a ValueError
that names the flag, :class:`nanotorl.flags.Checked`), whether it came from a flag, a preset or code.
"""
from dataclasses import dataclass, field, fields, is_dataclass, replace

from nanotorl.cli import ArgumentParser, parse_bool
from nanotorl.decode_step import CUDA_GRAPH
from nanotorl.flags import Checked, Valid, above, at_least, between, flag_name, help_line, one_of, option
from nanotorl.grpo import GRPOConfig
from nanotorl.prompt import PROMPT_TEMPLATES
from nanotorl.tool import COMPAT


@dataclass
class InputsConfig(Checked):
    """the base model and the problems"""
    model: str = option("", "Hugging Face Qwen2/Qwen3 directory; '' = the demo's base model, built on first use")
    data: str = option("", "training problems: JSONL {problem, answer} or ToRL parquet; '' = the demo's arithmetic")
    eval_data: str = option("", "held-out problems for validation, same formats; '' = none with --data (the demo: "
                                "its held-out arithmetic)")
    skip_bad_rows: bool = option(False, "skip (and count) malformed data rows instead of stopping")
    prompt_template: str = option("torl", "'torl': the paper's base-model prompt; 'chat': the checkpoint's chat "
                                          "template", one_of(*PROMPT_TEMPLATES))
    template_vars: str = option("", "JSON object for the chat template, e.g. '{\"enable_thinking\": false}'")
    demo_base_dir: str = option("", "where the demo's base model lives; '' = the committed nanotorl/demo_base "
                                    "(rebuilt there if deleted)")
    demo_train_problems: int = option(4000, "synthetic arithmetic problems in the demo's training set",
                                      at_least(1), "problems")
    long_prompts: str = option("drop", "a problem whose prompt plus --max-new-tokens passes the model's positions "
                                       "(max_position_embeddings): 'drop' it (one line says how many, from which "
                                       "sources) or 'refuse' to start", one_of("drop", "refuse"))


@dataclass
class RolloutConfig(Checked):
    """generation and the tool"""
    max_new_tokens: int = option(96, "the response budget: every token after the prompt, tool output included",
                                 at_least(1), "tokens")
    max_prompt_tokens: int = option(400, "longer training prompts are dropped (and counted)", at_least(1), "tokens")
    temperature: float = option(1.0, "sampling temperature, also the temperature of the trainer's log-probs",
                                above(0))
    top_p: float = option(1.0, "nucleus sampling: the smallest set of top tokens holding this much probability",
                          Valid("above 0 and at most 1 (1 = off)", lambda v: 0 < v <= 1, 0))
    max_tool_calls: int = option(1, "tool calls per response (C in the paper)", at_least(0, "0 (no tool) or more"),
                                 "calls")
    trigger: str = option("fence", "'fence': run a block once closed; 'output': when the model writes ```output",
                          one_of("fence", "output"))
    compat: str = option("none", "'torl': ToRL's own prompt, observation and budget rules (sets --trigger output)",
                         one_of(*COMPAT))
    gen_slots: int = option(128, "concurrent sequences per rank (KV-cache slots)", at_least(1), "sequences")
    cuda_graph: str = option("auto", "decode step as a CUDA graph: auto = on CUDA (a failed capture decodes "
                                     "eagerly, with a warning that says why), eagerly elsewhere", one_of(*CUDA_GRAPH))
    keep_kv_cache: bool = option(False, "keep the generator's KV cache allocated through the update (else freed "
                                        "for it)")
    sandbox_workers: int = option(2, "sandbox processes per rank running tool calls", at_least(1), "processes")
    sandbox_timeout: float = option(5.0, "wall and CPU time limit of one tool call", above(0), "seconds")
    code_penalty: float = option(0.0, "extra reward penalty for a failed tool call (the paper's ablation used 0.5)",
                                 at_least(0))
    tool_failure_limit: float = option(0.05, "stop when more of a step's calls than this fail in the sandbox "
                                             "itself", between(0, 1, "a fraction of the calls, from 0 (stop on the "
                                                                     "first sandbox failure) to 1 (never stop)"))


@dataclass
class OptimConfig(Checked):
    """the optimizer, precision and memory"""
    lr: float = option(5e-4, "AdamW learning rate (0: no update, the step only measures)", at_least(0))
    weight_decay: float = option(0.0, "AdamW weight decay", at_least(0))
    grad_clip: float = option(1.0, "clip the gradient to this global norm", above(0))
    micro_batch_tokens: int = option(4096, "tokens per packed micro-batch (gradient accumulation over them)",
                                     at_least(1), "tokens")
    pack_rows: bool = option(False, "several responses per row (nanotorl/attention.py keeps them apart); else one "
                                    "each")
    dtype: str = option("float32", "parameter dtype on CPU; on GPU the compute dtype under FSDP2 mixed precision",
                        one_of("float32", "bfloat16", "float16"))
    activation_checkpointing: bool = option(False, "recompute each layer's activations in the backward")
    cpu_offload: bool = option(False, "keep parameters and optimizer state in CPU memory (FSDP2 offload)")
    max_skipped_steps: int = option(3, "stop after this many updates in a row skipped as non-finite (0 = never)",
                                    at_least(0), "steps")


@dataclass
class LogConfig(Checked):
    """validation, checkpoints and logs"""
    out_dir: str = option("runs/demo", "metrics.jsonl, curves.png, checkpoints/ (a rerun resumes from there)")
    eval_every: int = option(10, "validate on the held-out set every this many steps (0 = never)", at_least(0),
                             "steps")
    eval_problems: int = option(200, "held-out problems used for validation (the first ones)", at_least(1),
                                "problems")
    eval_k: int = option(4, "samples per held-out problem for pass@k (1 = greedy only)", at_least(1), "samples")
    log_samples_every: int = option(0, "steps between training responses kept in samples.jsonl (0 = --eval-every)",
                                    at_least(0), "steps")
    log_samples: int = option(24, "training responses kept per such step: best, worst, one random per group",
                              at_least(0), "responses")
    log_eval_samples: int = option(32, "held-out greedy responses kept per validation (the first N problems)",
                                   at_least(0), "responses")
    save_every: int = option(20, "write a checkpoint every this many steps (and at the last)", at_least(1), "steps")
    keep_checkpoints: int = option(2, "newest checkpoints kept in out_dir/checkpoints", at_least(1), "checkpoints")
    tensorboard: bool = option(False, "also log to TensorBoard, in out_dir/tensorboard")
    wandb_project: str = option("", "also log to this Weights & Biases project; '' = off")
    debug: bool = option(False, "show the traceback of an error (else one 'error: ...' line, nanotorl.cli)")


@dataclass
class TrainConfig(Checked):
    """steps, problems per step and the seed"""
    steps: int = option(60, "optimizer steps of the run (a resumed run goes on up to this many)", at_least(1),
                        "steps")
    prompts_per_step: int = option(16, "problems per step, over all ranks (each gets --group-size responses)",
                                   at_least(1), "problems")
    seed: int = option(0, "seeds the problem order, the sampling and the demo's synthetic problems", at_least(0))
    inputs: InputsConfig = field(default_factory=InputsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)


def torl_recipe(size: str, gen_slots: int, micro_batch_tokens: int) -> TrainConfig:
    """ToRL (arXiv 2503.23383) on Qwen2.5-Math-``size``: 128 prompts x 16 samples, lr 1e-6, no KL, T=1, top-p 1,
    responses up to 3072 tokens, one tool call per response, ToRL's own prompt, trigger, observation and budget
    rules (``--compat torl``); the sizes differ only in what fits in memory."""
    return TrainConfig(
        steps=500, prompts_per_step=128,
        rollout=RolloutConfig(max_new_tokens=3072, max_prompt_tokens=400, gen_slots=gen_slots, sandbox_workers=16,
                              sandbox_timeout=10.0, trigger="output", compat="torl"),
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
    parser = ArgumentParser(usage="%(prog)s [--preset NAME] [--FLAG VALUE ...]",
                            description="ToRL training (GRPO with a Python tool). Defaults are the demo preset's; "
                                        "--preset changes some of them (nanotorl/config.py).")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="the defaults to start from")
    leaves = flag_fields()
    groups = {}
    for name, (path, f) in leaves.items():
        concern = path[0] if len(path) > 1 else ""
        if concern not in groups:
            owner = getattr(TrainConfig(), concern) if concern else TrainConfig()
            groups[concern] = parser.add_argument_group(f"{concern or 'run'} ({(owner.__doc__ or '').strip()})")
        group = groups[concern]
        if f.type in (bool, "bool"):
            group.add_argument(flag_name(name), dest=name, type=parse_bool, nargs="?", const=True, default=None,
                               metavar="BOOL", help=help_line(f))
            continue
        kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        group.add_argument(flag_name(name), dest=name, type=kind, default=None, metavar=kind.__name__.upper(),
                           help=help_line(f))
    args = vars(parser.parse_args(argv))
    if args["compat"] == "torl" and args["trigger"] is None:
        args["trigger"] = "output"  # ToRL's stop string; an explicit --trigger fence is refused by the Generator
    cfg = PRESETS[args.pop("preset")]
    for name, value in args.items():
        if value is not None:
            cfg = with_value(cfg, leaves[name][0], value)
    return cfg
