"""The per-rank memory plan (nanotorl/memory.py) of the torl-* presets on Qwen2.5-Math-1.5B and -7B, from the
arithmetic alone: nothing is allocated or measured. The model shapes are those of the checkpoints' config.json.

    python -m bench.memory_plan [--world 8]
"""
import argparse
import inspect

from bench.generate import qwen25_15b
from nanotorl.config import PRESETS
from nanotorl.generate import Generator
from nanotorl.memory import run_plan
from nanotorl.model import Qwen2Config

PREFILL_CHUNK = inspect.signature(Generator).parameters["prefill_chunk"].default  # train.py keeps the default

MODELS = {"torl-1.5b": qwen25_15b(),
          "torl-7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=8, help="GPUs (FSDP2 ranks) the weights are sharded over")
    args = parser.parse_args()
    for preset, model in MODELS.items():
        cfg = PRESETS[preset]
        ro = cfg.rollout
        plan = run_plan(cfg, model, args.world, True, ro.max_prompt_tokens + ro.max_new_tokens + PREFILL_CHUNK)
        print(f"--preset {preset} on {args.world} GPUs ({ro.gen_slots} slots, micro-batches of "
              f"{cfg.optim.micro_batch_tokens} tokens)\n{plan.table()}")


if __name__ == "__main__":
    main()
