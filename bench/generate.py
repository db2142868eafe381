"""Generator throughput against Hugging Face ``generate``, and the wall time that tool calls add.

    python -m bench.generate --quick          # CPU: demo model (random init), batch 1/16/64, 32 new tokens
    python -m bench.generate --quick --compile   # also ours with its CPU decoding forward compiled
    python -m bench.generate                  # CPU: batch 1/16/64/256, 64 new tokens
    python -m bench.generate --device cuda    # random Qwen2.5-1.5B-shaped model in bf16, 256 new tokens
    python -m bench.generate --device cuda --quick --batches 64,256   # the batches of the targets, 128 tokens

Throughput: the same weights (ours saved with ``nanotorl.checkpoint.save_model``, loaded by
``transformers.Qwen2ForCausalLM.from_pretrained``), the same equal-length prompts (no padding on either side),
greedy, and exactly ``new`` tokens per sequence (no stop ids on ours, ``min_new_tokens = max_new_tokens`` on
HF). tok/s = B * new / wall time of the whole call, prefill included; speedup = ours over HF in the same run;
same = fraction of rows where both produced the same tokens (near-ties of a random model may differ). On CPU
both run on one thread by default (``--threads``). On CUDA "ours" runs twice: plain, and with ``cuda_graph``
(the decode step captured once and replayed).

Roofline: decoding must read every weight and each sequence's KV cache once per step. With the average
context P + new/2, a step reads W + B (P + new/2) L 2 Hkv d e bytes (W: weight bytes, e: element size); at the
copy bandwidth measured in the same run (read + write of a large tensor) the whole call cannot take less than
new x that / bandwidth. pct_roofline = that bound over the measured time (prefill counted against us).

Tool overlap (batch 64): a scripted model (each sequence's next script token gets +1e4 on its logit) makes
a fraction of the sequences write a ```python block at staggered positions; a fake sandbox answers every call
after a fixed 20 ms. The same scripts then run with no sandbox (the block stays text and the observation is
generated instead of inserted), so both runs make the same tokens. overhead = wall time with tools / without.
On CUDA both runs decode with ``cuda_graph``.
"""
import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.common import copy_bandwidth, measure, save_result
from nanotorl.checkpoint import save_model
from nanotorl.data import arithmetic_problems
from nanotorl.demo import demo_config, save_demo_tokenizer
from nanotorl.generate import Generator, Request, SamplingParams
from nanotorl.metrics import print_table
from nanotorl.model import Qwen2, Qwen2Config
from nanotorl.fences import tool_call
from nanotorl.tokenizer import Tokenizer
from nanotorl.tool import format_observation
from nanotorl.sandbox.result import Result

QWEN_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen2.5"
GREEDY = SamplingParams(temperature=0.0)
FILLER = "Let me think about this step by step, carefully. "
COLUMNS = ["model", "B", "prompt", "new", "impl", "s", "tok/s", "speedup_vs_hf", "same_as_hf", "pct_roofline"]
TOOL_COLUMNS = ["model", "B", "new", "cuda_graph", "tool_seqs", "latency_ms", "s_with_tools", "s_without", "overhead",
                "tool_wait_s"]


def qwen25_15b() -> Qwen2Config:
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)


def build(device: str, tmp: Path):
    """(name, our model, HF model, tokenizer) with the same random weights, in eval mode on ``device``."""
    from transformers import Qwen2ForCausalLM
    if device == "cuda":
        name, dtype = "qwen2.5-1.5b-shape (bf16)", torch.bfloat16
        tok_dir = QWEN_TOKENIZER if (QWEN_TOKENIZER / "tokenizer.json").is_file() else tmp / "tok"
    else:
        name, dtype, tok_dir = "demo (fp32)", torch.float32, tmp / "tok"
    if tok_dir == tmp / "tok":
        save_demo_tokenizer(tok_dir)
    tok = Tokenizer(tok_dir)
    cfg = qwen25_15b() if device == "cuda" else demo_config(tok.vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2(cfg).init_weights().to(dtype).eval()
    save_model(model, tmp / "model", tokenizer_dir=tok_dir)
    hf = Qwen2ForCausalLM.from_pretrained(tmp / "model", dtype=dtype).to(device).eval()
    return name, model, hf, tok


def equal_length_prompts(tok: Tokenizer, n: int) -> list[list[int]]:
    """``n`` ToRL prompts of arithmetic problems, all of the most common token length (so HF needs no padding)."""
    by_length = {}
    for p in arithmetic_problems(2 * n + 64, seed=0):
        ids = tok.prompt_ids(p.problem)
        by_length.setdefault(len(ids), []).append(ids)
    group = max(by_length.values(), key=len)
    return [group[i % len(group)] for i in range(n)]


def roofline_s(model, B: int, P: int, new: int, bandwidth: float) -> float:
    """The least time ``new`` decoding steps of B sequences can take: bytes read per step over the bandwidth."""
    cfg = model.cfg
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = B * (P + new / 2) * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * \
        model.head_weight.element_size()
    return new * (weights + kv) / bandwidth


def throughput(name, model, hf, tok, B, new, device, iters, bandwidth, compiled=False) -> list[dict]:
    prompts = equal_length_prompts(tok, B)
    P = len(prompts[0])
    requests = [Request(p, max_new_tokens=new, sampling=GREEDY) for p in prompts]
    ids = torch.tensor(prompts, device=device)  # [B, P]
    mask = torch.ones_like(ids)
    gens = {"ours": Generator(model, tok, None, slots=B, max_len=P + new, stop_ids=[])}
    if device == "cuda":
        gens["ours+graph"] = Generator(model, tok, None, slots=B, max_len=P + new, stop_ids=[], cuda_graph=True)
    elif compiled:
        gens["ours+compile"] = Generator(model, tok, None, slots=B, max_len=P + new, stop_ids=[], compile=True)
    impls = {impl: gen.generate for impl, gen in gens.items()}
    impls["hf"] = lambda _: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                        do_sample=False, pad_token_id=tok.pad_id, eos_token_id=tok.eos_ids)
    hf_out = impls["hf"](requests)[:, P:].tolist()  # each implementation's first call, compared, is its warm-up
    same = {impl: sum(c.response_ids == h for c, h in zip(impls[impl](requests), hf_out)) / B for impl in gens}
    times = {impl: measure(lambda fn=fn: fn(requests), warmup=0, iters=iters, device=device)["time_s"]
             for impl, fn in impls.items()}
    for gen in gens.values():
        gen.close()
    bound = roofline_s(model, B, P, new, bandwidth)
    return [{"model": name, "threads": torch.get_num_threads(), "B": B, "prompt": P, "new": new, "impl": impl,
             "s": t, "tok/s": B * new / t, "speedup_vs_hf": times["hf"] / t, "same_as_hf": same.get(impl, ""),
             "pct_roofline": 100 * bound / t} for impl, t in times.items()]


class Scripted(torch.nn.Module):
    """A model whose sequences write given scripts: at position p of a slot, the logit of ``script[p + 1]`` gets
    +1e4. A slot's script is looked up by its prompt (all prompts of one length, the first tokens of a prefill
    row that starts at position 0: the row may be padded) and kept in a device table, read with tensor indexing only (so a decode step can be captured in a CUDA graph). The target id
    travels to :meth:`logits` as one extra fp32 feature of the hidden state (the generator reorders rows)."""

    def __init__(self, model, scripts: dict[tuple, list[int]], slots: int):
        super().__init__()
        self.model, self.cfg, self.scripts = model, model.cfg, scripts
        self.prompt_len = len(next(iter(scripts)))
        if any(len(p) != self.prompt_len for p in scripts):
            raise ValueError(f"Scripted needs prompts of one length, got {sorted({len(p) for p in scripts})}")
        length = max(len(v) for v in scripts.values()) + 1
        self.table = torch.full((slots, length), -1, device=model.head_weight.device)  # [slots, L]: script ids

    def forward(self, ids, positions=None, seq_ids=None, cache=None, slots=None):
        h = self.model(ids, positions, seq_ids, cache, slots)
        if isinstance(ids, list):  # groups of rows in one forward
            return [self._targeted(*group) for group in zip(h, ids, positions, slots)]
        return self._targeted(h, ids, positions, slots)

    def _targeted(self, h, ids, positions, slots):
        """h [B, T, D] -> [B, T, D + 1]: the script's next id (or -1) as an extra feature."""
        if ids.shape[1] > 1:  # a prefill: new prompts take their scripts
            for b, (slot, start) in enumerate(zip(slots.tolist(), positions[:, 0].tolist())):
                if start == 0:
                    script = torch.tensor(self.scripts[tuple(ids[b, :self.prompt_len].tolist())])
                    self.table[slot] = -1
                    self.table[slot, :len(script)] = script
        nxt = (positions + 1).clamp(max=self.table.shape[1] - 1)
        target = self.table[slots[:, None], nxt].float()  # [B, T]
        return torch.cat([h.float(), target[..., None]], -1)  # [B, T, D + 1]

    def logits(self, x):
        logits = self.model.logits(x[..., :-1].to(self.model.head_weight.dtype)).float()  # [R, V]
        target = x[..., -1].long()                                                       # [R], -1: no script
        bias = torch.where(target >= 0, 1e4, 0.0)                                         # fixed shapes, no sync
        return logits.scatter_add(-1, target.clamp(min=0)[..., None], bias[..., None])


class FakeSandbox:
    """``submit(code) -> Future`` whose result (stdout "5") arrives ``latency`` seconds later."""

    def __init__(self, latency: float, workers: int):
        self.latency, self.pool = latency, ThreadPoolExecutor(workers)

    def _run(self, code):
        time.sleep(self.latency)
        return Result("ok", "5\n", wall_time=self.latency)

    def submit(self, code):
        return self.pool.submit(self._run, code)


def tool_script(tok: Tokenizer, prompt, new: int, lead: int | None) -> list[int]:
    """prompt + ``new`` response tokens: filler, and with ``lead`` set a python block after ``lead`` filler
    tokens followed by the observation exactly as the generator inserts it, then filler."""
    filler = tok.encode(FILLER * (new // 8 + 2))
    if lead is None:
        return list(prompt) + filler[:new]
    block, written = tok.encode("```python\nprint(2 + 3)\n```\n"), list(filler[:lead])
    for t in block:  # the generator pauses at the first token that closes the block
        written.append(t)
        if tool_call(tok.decode(written), "fence"):
            break
    head = "" if tok.decode(written[-8:]).endswith("\n") else "\n"
    written += tok.encode(f"{head}```output\n{format_observation('5', None, 'ok')}\n```\n")
    if len(written) > new:
        raise ValueError(f"a tool script needs {len(written)} tokens, more than new={new}: raise --new")
    return list(prompt) + written + filler[:new - len(written)]


def tool_overlap(name, model, tok, B, new, device, iters, fraction=0.5, latency=0.02) -> dict:
    prompts = equal_length_prompts(tok, 4 * B)
    prompts = list({tuple(p): p for p in prompts}.values())[:B]  # distinct: a prompt names its script
    if len(prompts) < B:
        raise ValueError(f"only {len(prompts)} distinct prompts of one length for batch {B}")
    P = len(prompts[0])
    leads = [(i * 5) % (new // 2) if int((i + 1) * fraction) > int(i * fraction) else None for i in range(B)]
    scripts = {tuple(p): tool_script(tok, p, new, lead) for p, lead in zip(prompts, leads)}
    scripted = Scripted(model, scripts, B)
    requests = [Request(p, max_new_tokens=new, sampling=GREEDY) for p in prompts]
    box = FakeSandbox(latency, workers=B)
    graph = device == "cuda"
    with_tools = Generator(scripted, tok, box, slots=B, max_len=P + new, stop_ids=[], cuda_graph=graph)
    without = Generator(scripted, tok, None, slots=B, max_len=P + new, stop_ids=[], cuda_graph=graph)
    for gen in (with_tools, without):  # both must write exactly the scripts
        for p, c in zip(prompts, gen.generate(requests)):
            if c.response_ids != scripts[tuple(p)][P:]:
                raise RuntimeError("a scripted sequence left its script: the tool-overlap figures would be wrong")
    n_tools = sum(lead is not None for lead in leads)
    wait0 = with_tools.stats["tool_wait_s"]
    t_with = measure(lambda: with_tools.generate(requests), warmup=0, iters=iters, device=device)["time_s"]
    t_without = measure(lambda: without.generate(requests), warmup=0, iters=iters, device=device)["time_s"]
    box.pool.shutdown()
    return {"model": name, "threads": torch.get_num_threads(), "B": B, "new": new, "cuda_graph": graph,
            "tool_seqs": n_tools,
            "latency_ms": latency * 1e3, "s_with_tools": t_with, "s_without": t_without, "overhead": t_with / t_without,
            "tool_wait_s": (with_tools.stats["tool_wait_s"] - wait0) / iters}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer tokens and iterations")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,16,64,256; 1,16,64 with --quick)")
    parser.add_argument("--new", type=int, default=None, help="new tokens per sequence")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both sides (0: torch's default); "
                        "1 by default because on a busy machine idle-spinning OpenMP threads make timings erratic")
    parser.add_argument("--compile", action="store_true", help="CPU: also our generator with its decoding forward "
                        "compiled (Generator(compile=True), 'ours+compile'; its warm-up call compiles)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch; run on a GPU machine or use --device cpu")
    cuda = args.device == "cuda"
    batches = (1, 16, 64) if args.quick else (1, 16, 64, 256)
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
    new = args.new or {(False, True): 32, (False, False): 64, (True, True): 128, (True, False): 256}[
        (cuda, args.quick)]
    iters = 2 if args.quick else 3
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.device}, {torch.get_num_threads()} CPU thread(s), {new} new tokens per sequence")
    with tempfile.TemporaryDirectory() as tmp:
        name, model, hf, tok = build(args.device, Path(tmp))
    bandwidth = copy_bandwidth(args.device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    rows, tag = [], "_quick" if args.quick else ""
    for B in batches:
        rows += throughput(name, model, hf, tok, B, new, args.device, iters, bandwidth, args.compile)
        print_table(rows[-3 if cuda or args.compile else -2:], COLUMNS)
        save_result("generate", rows, tag)  # after every batch: a run stopped at its time limit keeps them
    print()
    print_table(rows, COLUMNS)
    tool = tool_overlap(name, model, tok, 64, new, args.device, iters)
    print()
    print_table([tool], TOOL_COLUMNS)
    save_result("generate", rows + [tool], tag)


if __name__ == "__main__":
    main()
