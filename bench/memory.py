"""Peak memory of each phase of a training step against the 16 bytes per parameter of fp32 weights, gradients and
AdamW's two moments, on a real model shape with random weights.

    python -m bench.memory --shape qwen2.5-0.5b          # 494M parameters: about 10 GB on CPU
    python -m bench.memory --shape qwen3-0.6b --nproc 2  # under torchrun, the maximum over the ranks

A random-init checkpoint of the shape (vocabulary of 151,936 rows, as the released models) is written with the real
Qwen2.5 tokenizer (``../shared/tokenizers/qwen2.5``), then ``train.py --preset torl-1.5b`` runs on it scaled down
(``--prompts``, ``--group-size``, ``--max-new-tokens``, fp32, the demo's arithmetic problems) for ``--steps`` steps,
saving after step 2 and the last. Its metrics.jsonl carries each phase's peak (``memory_<phase>_gb``: RSS on CPU,
``max_memory_allocated`` on CUDA; the save's in the record of the step after it); the table shows every step's and
their ratio to the bound.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import save_result
from nanotorl.checkpoint import save_model
from nanotorl.metrics import print_table
from nanotorl.model import Qwen2, Qwen2Config

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "tokenizers" / "qwen2.5"
SHAPES = {  # the released models' config.json
    "qwen2.5-0.5b": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                rope_theta=1e6),
    "qwen3-0.6b": Qwen2Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=128, qkv_bias=False,
                              qk_norm=True, tie_word_embeddings=True, rope_theta=1e6),
}
PHASES = ("generate", "train", "save")


def random_checkpoint(shape: str, path: Path, tokenizer: Path) -> int:
    """A random-init checkpoint of ``shape`` with the tokenizer's files in ``path``; returns its parameter count."""
    torch.manual_seed(0)
    model = Qwen2(SHAPES[shape]).init_weights()
    save_model(model, path, tokenizer_dir=tokenizer)
    fill_vocabulary(path / "tokenizer.json", model.cfg.vocab_size)
    return sum(p.numel() for p in model.parameters())


def fill_vocabulary(file: Path, vocab_size: int) -> None:
    """Name the embedding rows the tokenizer has no token for (Qwen's padding rows: 151,665 to 151,935), which
    random weights sample as readily as any other, as special tokens ``<|row_N|>``."""
    raw = json.loads(file.read_text())
    known = set(raw["model"]["vocab"].values()) | {t["id"] for t in raw["added_tokens"]}
    raw["added_tokens"] += [{"id": i, "content": f"<|row_{i}|>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i in range(vocab_size) if i not in known]
    file.write_text(json.dumps(raw))


def run_training(model_dir: Path, out: Path, args) -> list[dict]:
    """train.py (torchrun when ``--nproc`` > 1) on the checkpoint; its metrics.jsonl records after step 0."""
    launcher = [sys.executable] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    flags = ["--preset", "torl-1.5b", "--model", str(model_dir), "--out-dir", str(out), "--steps", str(args.steps),
             "--prompts-per-step", str(args.prompts), "--group-size", str(args.group_size), "--max-new-tokens",
             str(args.max_new_tokens), "--gen-slots", str(args.prompts * args.group_size), "--dtype", "float32",
             "--eval-every", "0", "--save-every", "2", "--sandbox-workers", "2", "--pack-rows", args.pack_rows]
    subprocess.run(launcher + [str(REPO / "train.py")] + flags, check=True, cwd=out.parent,
                   env=dict(os.environ, PYTHONPATH=str(REPO)))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] > 0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--pack-rows", choices=["true", "false"], default="true")
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        params = random_checkpoint(args.shape, Path(tmp) / "model", args.tokenizer)
        records = run_training(Path(tmp) / "model", Path(tmp) / "run", args)
    bound = 16 * params / 1e9
    rows = [{"step": r["step"], "phase": phase, "peak_gb": round(r[f"memory_{phase}_gb"], 2),
             "x_bound": round(r[f"memory_{phase}_gb"] / bound, 2)}
            for r in records for phase in PHASES if f"memory_{phase}_gb" in r]
    print(f"{args.shape}: {params / 1e6:.0f}M parameters, bound 16 bytes each = {bound:.2f} GB; {args.nproc} "
          f"process(es), pack rows {args.pack_rows}; a save's peak shows in the step after it")
    print_table(rows, ["step", "phase", "peak_gb", "x_bound"])
    save_result("memory", [{"shape": args.shape, "params": params, "bound_gb": bound, "nproc": args.nproc,
                            "pack_rows": args.pack_rows, **row} for row in rows], tag=f"_{args.shape}")


if __name__ == "__main__":
    main()
