"""Shared fixtures: the Triton interpreter on CPU, random Hugging Face Qwen2/Qwen3 checkpoints (and instruct-style
tokenizer files), the path to ../shared, a scripted policy."""
import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sm90

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# Triton defines its own library functions (tl.zeros, tl.sum, ...) for the interpreter only if TRITON_INTERPRET=1
# when triton is first imported, and @triton.jit reads it when a kernel is defined. So on CPU triton is imported
# here, before any test module, with the variable set; it is then removed again, so that the model, generator
# and trainer under test keep their PyTorch reference path (kernels.use_triton), and the kernel tests turn the
# interpreter on for themselves with `interpreted` and the `triton_interpreter` fixture.
if DEV == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: E402,F401
    del os.environ["TRITON_INTERPRET"]

from nanotorl.compiled_decode import cxx_compiler  # noqa: E402  (after triton: it imports the model and kernels)

# the tests that compile the CPU decoding forward (nanotorl/compiled_decode.py) need a C++ compiler for inductor
needs_cxx = pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler on PATH (g++): torch.compile's CPU "
                               "code is built with one")


def _release(version: str) -> tuple:
    return tuple(int(x) for x in version.split("+")[0].split(".")[:2])


if DEV == "cpu" and _release(triton.__version__) < (3, 7) and _release(importlib.metadata.version("numpy")) >= (2, 4):
    raise RuntimeError(f"the Triton {triton.__version__} interpreter, which runs the kernel tests on CPU, calls int() "
                       f"on one-element arrays, an error with numpy {importlib.metadata.version('numpy')}: "
                       "pip install 'numpy<2.4' (or triton >= 3.7)")


def interpreted(name: str):
    """Import the kernel module ``name`` with its kernels defined for the interpreter on CPU, after the kernel
    modules whose Triton functions it imports (an interpreted kernel can only call interpreted functions)."""
    module = importlib.import_module(name)
    if DEV == "cpu":
        imported_from = {getattr(getattr(v, "fn", None), "__module__", None) for v in vars(module).values()}
        for dependency in sorted(m for m in imported_from - {name} if m and m.startswith("nanotorl.kernels.")):
            interpreted(dependency)
        before = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            module = importlib.reload(module)
        finally:  # as it was: a test that runs kernels keeps it set (the triton_interpreter fixture)
            if before is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = before
    return module


@pytest.fixture
def triton_interpreter(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while kernels run: set it for one test on CPU."""
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def assert_compiles_for_h100(launches: list[dict]) -> None:
    """Compile each launch recorded by ``sm90.record_launches`` for sm_90 with the NVIDIA backend tools of this
    Triton install, no GPU needed: each must compile, keep everything in registers (no local-memory stack), fit
    the 227 KiB of shared memory of an H100 SM, use no acquire-release atomics and read back nothing it stored
    without a barrier between (see tests/sm90.py)."""
    nvidia = importlib.util.find_spec("triton.backends.nvidia")
    cuobjdump = nvidia and os.path.join(os.path.dirname(nvidia.origin), "bin", "cuobjdump")
    if not cuobjdump or not os.path.exists(cuobjdump):
        pytest.skip("this Triton install has no NVIDIA backend tools (ptxas, cuobjdump) to compile with")
    assert launches, "no kernel launch was recorded: the code under test did not reach a Triton kernel"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.sm90", cuobjdump], input=json.dumps(launches), env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    bad = [f"{sm90.describe(launch)}: {usage}"
           for launch, usage in zip(launches, json.loads(run.stdout.strip().splitlines()[-1]))
           if "error" in usage or usage["stack"] or usage["shared"] > 227 * 1024 or usage["acq_rel"]
           or usage["unfenced"]]
    assert not bad, f"{len(bad)} of {len(launches)} launches fail on sm_90:\n" + "\n".join(bad)


def shared_path(*parts) -> Path:
    """A path under ../shared, or a skip that says why the test cannot run."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the shared fixtures beside the repository")
    return path


def save_chat_tokenizer(path, template="qwen3"):
    """An instruct model's tokenizer files, small: the demo tokenizer plus <|im_start|> and <|im_end|>, eos_token
    <|im_end|>, generation_config.json's end ids [<|im_end|>, <|endoftext|>] and a chat template of
    tests/chat_templates. Returns (<|im_end|>, <|endoftext|>) ids."""
    from tokenizers import AddedToken

    from nanotorl.demo import demo_tokenizer
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tk = demo_tokenizer()
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    tk.save(str(path / "tokenizer.json"))
    ends = tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>")
    chat_template = (Path(__file__).parent / "chat_templates" / f"{template}.jinja").read_text()
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": chat_template}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": list(ends)}))
    return ends


def make_chat_checkpoint(path):
    """A tiny random Qwen3 (our model with Qwen3's switches, head_dim apart from hidden/heads) with the
    :func:`save_chat_tokenizer` files: an instruct checkpoint to prompt with --prompt-template chat."""
    from nanotorl.checkpoint import save_model
    from nanotorl.model import Qwen2, Qwen2Config
    from nanotorl.tokenizer import Tokenizer
    ends = save_chat_tokenizer(path)
    cfg = Qwen2Config(vocab_size=Tokenizer(path).vocab_size, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                      max_position_embeddings=1024, tie_word_embeddings=False, qkv_bias=False, qk_norm=True)
    save_model(Qwen2(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(0)), path,
               tokenizer_dir=path, eos_ids=list(ends))
    return path


def make_hf_checkpoint(path, seed=0, dtype=torch.float32, model_type="qwen2", **overrides):
    """Save a random ``transformers`` Qwen2ForCausalLM (or Qwen3ForCausalLM for ``model_type="qwen3"``, head_dim
    hidden/heads unless given) with non-trivial weights (biases and norms, q/k norms included)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (dev extra)")
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
               rms_norm_eps=1e-6)
    cfg.update(overrides)
    torch.manual_seed(seed)
    if model_type == "qwen3":
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model = model.to(dtype).eval()
    model.save_pretrained(path)
    return model


# The sandbox in both namespace modes. "no-namespaces" starts each server under a seccomp filter that makes
# unshare() fail with EPERM, as many containers do: the server really is refused and confines runs without them.
REFUSE_UNSHARE = """import ctypes, platform
from nanotorl.sandbox.policy import SockFilter, SockFprog
unshare = {"x86_64": 272, "aarch64": 97}[platform.machine()]
prog = (SockFilter * 4)((0x20, 0, 0, 0), (0x15, 0, 1, unshare), (0x06, 0, 0, 0x50001), (0x06, 0, 0, 0x7FFF0000))
libc = ctypes.CDLL(None)
assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.byref(SockFprog(4, prog)), 0, 0) == 0
"""


def sandbox_pool(mode: str, **kwargs):
    """A SandboxPool whose servers start with namespaces, or with unshare() refused (``mode``)."""
    from nanotorl import sandbox
    main = sandbox.pool.SERVER_MAIN
    if mode == "no-namespaces":
        sandbox.pool.SERVER_MAIN = REFUSE_UNSHARE + main
    try:
        pool = sandbox.pool.SandboxPool(**kwargs)
    finally:
        sandbox.pool.SERVER_MAIN = main
    expected = mode == "namespaces"
    assert ("pid" in pool.info["namespaces"]) == expected, f"{mode}: the server entered {pool.info['namespaces']}"
    return pool


@pytest.fixture(scope="module")
def sandbox_pool_factory():
    """sandbox_pool(mode, **kwargs), closed at the end of the module."""
    pools = []

    def make(mode: str, **kwargs):
        pools.append(sandbox_pool(mode, **kwargs))
        return pools[-1]

    yield make
    for pool in pools:
        pool.close()


class ScriptedPolicy:
    """A Generator stand-in with known responses: ``respond(problem, sample)`` gives the (text, tool calls) of a
    problem's response, ``sample`` its index among the problem's sampled requests (None for a greedy request).
    The sampled requests of a problem must come in sample order, as eval.py and train.py make them."""

    def __init__(self, tokenizer, problems: list[str], respond):
        self.tokenizer, self.respond = tokenizer, respond
        self.by_prompt = {tuple(tokenizer.prompt_ids(p)): p for p in problems}
        self.drawn = {}

    def generate(self, requests, progress=None):
        from nanotorl.generate import Completion  # here: triton must be imported first, as above
        out = []
        for r in requests:
            problem = self.by_prompt[tuple(r.prompt_ids)]
            sample = None
            if r.sampling.temperature > 0:
                sample = self.drawn[problem] = self.drawn.get(problem, -1) + 1
            text, calls = self.respond(problem, sample)
            ids = self.tokenizer.encode(text)
            out.append(Completion(list(r.prompt_ids), ids, [1] * len(ids), [0.0] * len(ids), list(calls), "eos"))
        return out
