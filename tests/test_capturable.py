"""What a CUDA-graph capture of the decode step (nanotorl/decode_step.py) needs, checked on CPU.

* No host sync inside the step: the generator runs with ``cuda_graph`` and the Triton kernels (interpreted), and
  every step it would capture runs under ``host_sync.no_host_sync``, for the models a GPU run decodes with: a
  plain model, the test suite's forced-script model and the bench's scripted model. The checker itself is tested
  against one member of each class it must catch.
* The step's kernels compile for sm_90 for every model and dtype the GPU tests and benchmarks decode with.
* A failed capture names the cause that its CUDA error points to.
FSDP2 around the step (its hooks must stay outside the capture) is tested in tests/test_dist.py.
"""
import pytest
import torch

import bench.decode_step
import bench.generate
from conftest import assert_compiles_for_h100, interpreted
from host_sync import HostSyncError, no_host_sync
from nanotorl.decode_step import DecodeStep, capture_hint
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Generator, Request, SamplingParams
from nanotorl.model import KVCache, Qwen2
from nanotorl.tokenizer import Tokenizer
from sm90 import record_launches
from test_generate import Forced, prompts, scripted, tiny_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_demo_tokenizer(path)
    return Tokenizer(path)


X, MASK, IDX = torch.randn(5, 7), torch.randn(5, 7) > 0, torch.tensor([1, 3])
SYNCING = {  # one member of each class, as it would be written
    "item": lambda: X.sum().item(), "if on a tensor": lambda: 1 if MASK.any() else 0, "int()": lambda: int(X[0, 0]),
    "nonzero": lambda: X.nonzero(), "boolean-mask read": lambda: X[MASK[:, 0]],
    "boolean-mask write": lambda: X.clone().__setitem__(MASK, 0.0), "tolist": lambda: X.tolist(),
    "masked_select": lambda: X.masked_select(MASK), "unique": lambda: X.unique(),
    "tensor repeats": lambda: X.repeat_interleave(IDX.new_tensor([1, 2, 1, 1, 1]), dim=0),
    "one_hot": lambda: torch.nn.functional.one_hot(IDX, 9), "torch.tensor": lambda: torch.tensor([1, 2]),
}
DEVICE_ONLY = {
    "integer indexing": lambda: X[IDX], "where": lambda: torch.where(MASK, X, 0.0), "slice": lambda: X[1:3],
    "scatter_add": lambda: X.scatter_add(-1, IDX.expand(5, 2), X[:, :2]), "masked_fill": lambda: X.masked_fill(MASK, 0),
    "argmax": lambda: X.argmax(-1), "gather": lambda: X.gather(1, IDX.expand(5, 2)),
}


@pytest.mark.parametrize("name", SYNCING)
def test_checker_catches_each_kind_of_host_sync(name):
    with pytest.raises(HostSyncError), no_host_sync():
        SYNCING[name]()


def test_checker_lets_device_only_ops_through():
    with no_host_sync():
        for op in DEVICE_ONLY.values():
            op()


@pytest.fixture
def checked_steps(monkeypatch, triton_interpreter):
    """Every decode step runs under no_host_sync with the Triton kernels, as on a GPU; yields the step count."""
    interpreted("nanotorl.kernels.decode_attention")
    interpreted("nanotorl.kernels.rng")  # before the sampling kernels, which call its noise functions
    interpreted("nanotorl.kernels.sampling")
    steps, run = [], DecodeStep._run

    def checked(self):
        with no_host_sync():
            run(self)
        steps.append(1)

    monkeypatch.setattr(DecodeStep, "_run", checked)
    return steps


def test_decode_step_of_plain_and_forced_models_never_syncs(tok, checked_steps):
    reqs = [Request(p, max_new_tokens=3, seed=i, sampling=SamplingParams(temperature=float(i % 2), top_k=5 * i))
            for i, p in enumerate(prompts(tok, 2))]
    Generator(tiny_model(tok.vocab_size), tok, slots=2, max_len=48, cuda_graph=True).generate(reqs)
    prompt, script, _, _, _ = scripted(tok, "Let me compute.", "", "")
    out = Generator(Forced(script, tok.vocab_size), tok, slots=2, max_len=64, cuda_graph=True).generate(
        [Request(prompt, max_new_tokens=5, sampling=SamplingParams(temperature=0.0))])[0]
    assert out.response_ids == script[len(prompt):len(prompt) + 5]
    assert len(checked_steps) >= 2 + 4  # the first token of each request is drawn after its prefill


def test_bench_scripted_model_decode_step_never_syncs(tok, checked_steps):
    """bench.generate's tool-overlap model: its logits must add the script's bias without a boolean mask."""
    new = 6
    prompt_ids = [tok.encode(f"What is {10 + i} + {20 + i}?") for i in range(2)]  # one length, as in the bench
    scripts = {tuple(p): bench.generate.tool_script(tok, p, new, None) for p in prompt_ids}
    scripted_model = bench.generate.Scripted(tiny_model(tok.vocab_size), scripts, slots=2)
    reqs = [Request(p, max_new_tokens=new, sampling=SamplingParams(temperature=0.0)) for p in prompt_ids]
    outs = Generator(scripted_model, tok, slots=2, max_len=48, stop_ids=[], cuda_graph=True).generate(reqs)
    assert [o.response_ids for o in outs] == [scripts[tuple(p)][len(p):] for p in prompt_ids]
    assert len(checked_steps) == new - 1


def _decode_step_launches(tok):
    """The decode steps of the GPU tests and benchmarks: the tiny test model of test_generate (head_dim 8) in fp32
    and bf16; the Qwen2.5-1.5B shape in bf16 at bench.generate's batches and cache lengths (prompts of 64 and 128
    tokens stand in for its tokenized ones) and at bench.decode_step's."""
    def step(cfg, dtype, slots, length):
        with torch.device("meta"):
            model = Qwen2(cfg).to(dtype).eval()
            DecodeStep(model, KVCache(cfg, slots, length, dtype=dtype), graph=False)._run()

    for dtype in (torch.float32, torch.bfloat16):
        step(tiny_model(tok.vocab_size).cfg, dtype, 4, 128 + 512)
    qwen = bench.generate.qwen25_15b()
    for slots in (1, 16, 64, 256):
        for length in (64 + 128 + 512, 128 + 256 + 512):
            step(qwen, torch.bfloat16, slots, length)
    for slots, length in bench.decode_step.GPU_CASES:
        step(qwen, torch.bfloat16, slots, length)


def test_decode_step_kernels_compile_for_h100(tok):
    """Every decode-attention and sampling launch of those steps compiles for sm_90 (tl.dot needs K >= 16, so a
    head_dim of 8 is padded), without register spills, within shared memory."""
    with torch.no_grad():
        assert_compiles_for_h100(record_launches(lambda: _decode_step_launches(tok)))


@pytest.mark.parametrize("error,cause", [
    ("CUDA error: capture sequence contains a fork that was not joined to the primary stream", "dist.gathered"),
    ("cudaErrorStreamCaptureUnjoined", "never joined back"),
    ("CUDA error: operation not permitted when stream is capturing", "synchronised with the host"),
    ("CUDA error: operation failed due to a previous error during capture (cudaErrorStreamCaptureInvalidated)",
     "earlier operation"),
])
def test_failed_capture_names_its_cause(error, cause):
    assert cause in capture_hint(error)
    if "join" in error.lower():
        assert "host" not in capture_hint(error)


def test_failed_capture_falls_back_to_eager_decoding_and_says_why(tok, monkeypatch):
    def failing(self, *args, **kwargs):
        raise RuntimeError("capturing the decode step as a CUDA graph failed: cudaErrorStreamCaptureUnjoined")

    monkeypatch.setattr(DecodeStep, "__init__", failing)
    model = tiny_model(tok.vocab_size)
    reqs = [Request(p, max_new_tokens=4, sampling=SamplingParams(temperature=0.0)) for p in prompts(tok, 2)]
    gen = Generator(model, tok, slots=2, max_len=48, cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="decoding eagerly.*cudaErrorStreamCaptureUnjoined"):
        got = gen.generate(reqs)
    assert not gen.cuda_graph  # once: the next call does not try again
    want = Generator(model, tok, slots=2, max_len=48).generate(reqs)
    assert [o.response_ids for o in got] == [o.response_ids for o in want]
