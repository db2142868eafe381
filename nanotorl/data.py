"""Problems for training and evaluation: the ToRL prompt, JSONL and ToRL-parquet loaders, synthetic arithmetic.

A problem is a question and a ground-truth answer string (compared with `reward.is_equivalent`). Files:
- JSONL, one object per line: {"problem": str, "answer": str | number[, "id": str, "source": str]}
  (as in ../shared/data). A missing id becomes "<file stem>-<line - 1>", a missing source the file stem.
- ToRL parquet (verl format): `prompt` = chat list [{"role": "user", "content": ...}, ...],
  `reward_model` = {"ground_truth": ..., ...}, `data_source`, `extra_info`. The problem is the last user
  message; if that message is already the full ToRL prompt (TORL_TEMPLATE around the problem), the template is
  stripped so that `torl_prompt(problem.problem)` gives it back; otherwise the content is kept as the bare
  problem. Ids are "<file stem>-<row - 1>", the source is `data_source` (the file stem if absent). A parquet file
  with plain `problem` and `answer` columns is read like JSONL.
The source names the benchmark a row belongs to (ToRL's test.parquet holds aime24, aime25 and math500): eval.py and
train.py's validation report one row per source.
"""

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

TORL_INSTRUCTION = ("Please integrate natural language reasoning with programs to solve the problem above, "
                    "and put your final answer within \\boxed{}.")
TORL_TEMPLATE = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
                 "User: " + TORL_INSTRUCTION + "\n{problem}\nAssistant:")

_HEAD, _TAIL = TORL_TEMPLATE.split("{problem}")
# The template with any run of whitespace in it matching any run of whitespace (files differ in newlines).
_TEMPLATED = re.compile(
    r"\s*" + r"\s+".join(map(re.escape, _HEAD.split())) + r"\s+(?P<problem>.*?)\s+"
    + r"\s+".join(map(re.escape, _TAIL.split())) + r"\s*", re.DOTALL)


@dataclass
class Problem:
    id: str
    problem: str
    answer: str
    source: str = ""


def torl_prompt(problem: str) -> str:
    """The ToRL prompt for a base model (no chat template): TORL_TEMPLATE with the problem filled in."""
    return TORL_TEMPLATE.replace("{problem}", problem)


def torl_exact_prompt(problem: str) -> str:
    """ToRL's own prompt, byte for byte (``--compat torl``): ``tir_base_0309`` in GAIR-NLP/ToRL's
    verl/utils/dataset/rl_dataset.py ends with a newline after "Assistant:", which :func:`torl_prompt` leaves out."""
    return torl_prompt(problem) + "\n"


def torl_user_message(problem: str) -> str:
    """The ToRL instruction and the problem, as one user message for a chat template (the paper's wording)."""
    return f"{TORL_INSTRUCTION}\n{problem}"


def bare_problem(text: str) -> str:
    """The problem inside a full ToRL prompt, or `text` itself (stripped) if it is not one."""
    m = _TEMPLATED.fullmatch(text)
    return (m.group("problem") if m else text).strip()


class LoadedProblems(list):
    """The list of problems from `load_problems`, with `skipped`: one "file:line: reason" per skipped row."""

    def __init__(self, problems: list[Problem], skipped: list[str]):
        super().__init__(problems)
        self.skipped = skipped


def _answer(value, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: the answer must be a string or a number, found {type(value).__name__} {value!r}")
    answer = str(value).strip()
    if not answer:
        raise ValueError(f"{where}: the answer is empty")
    return answer


def _problem_text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: 'problem' must be a non-empty string, found {value!r:.80}")
    return value


def _from_plain(row, where: str, default_id: str, default_source: str) -> Problem:
    """A {problem, answer[, id, source]} row."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object {{\"problem\": ..., \"answer\": ...}}, found {type(row).__name__}")
    missing = [k for k in ("problem", "answer") if row.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; each row needs 'problem' and 'answer' (found keys {sorted(row)})")
    problem_id = row.get("id")
    return Problem(
        id=default_id if problem_id is None else str(problem_id),
        problem=_problem_text(row["problem"], where),
        answer=_answer(row["answer"], where),
        source=str(row.get("source") or default_source))


def _from_torl(row: dict, where: str, default_id: str, default_source: str) -> Problem:
    """A verl/ToRL row: chat-list prompt and reward_model.ground_truth."""
    prompt, reward_model = row.get("prompt"), row.get("reward_model")
    if isinstance(prompt, str):
        content = prompt
    else:
        users = [m.get("content") for m in prompt or [] if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ValueError(f"{where}: 'prompt' has no user message; expected [{{'role': 'user', 'content': ...}}], found {prompt!r:.120}")
        content = users[-1]
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise ValueError(f"{where}: expected reward_model = {{'ground_truth': ...}}, found {reward_model!r:.120}")
    return Problem(
        id=default_id,
        problem=bare_problem(_problem_text(content, where)),
        answer=_answer(reward_model["ground_truth"], where),
        source=str(row.get("data_source") or default_source))


def _jsonl_rows(path: Path):
    """(line number, parsed row or the ValueError for that line) for every non-blank line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, ValueError(f"{path}:{line_no}: not UTF-8 text (byte {e.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})")


def _parquet_rows(path: Path):
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pyarrow.ArrowException as e:
        raise ValueError(f"{path}: not a readable parquet file ({' '.join(str(e).split())})") from None
    if not {"prompt", "problem"} & set(table.column_names):
        raise ValueError(f"{path}: no 'prompt' column (ToRL parquet: prompt, reward_model[, data_source]) and no "
                         f"'problem' column (problem, answer); found columns {table.column_names}")
    yield from enumerate(table.to_pylist(), 1)


def load_problems(path, *, skip_bad: bool = False) -> LoadedProblems:
    """Problems from a JSONL or parquet file (format in the module docstring).

    A malformed row raises ValueError "<file>:<line>: <what is wrong>; pass --skip-bad-rows ..." (line = 1-based
    line of a JSONL file, 1-based row of a parquet file; the flag of train.py and eval.py that sets ``skip_bad``),
    and a file that is not parquet "<file>: not a readable parquet file". With skip_bad=True such rows are skipped
    instead and their messages kept in the result's `skipped` list. Two rows with the same id are an error too (the second is the bad row).
    Duplicated problem texts are kept: see `find_duplicates`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}; expected a .jsonl or .parquet file")
    parquet = path.suffix == ".parquet"
    problems, skipped, seen_ids = [], [], set()
    for line_no, row in (_parquet_rows if parquet else _jsonl_rows)(path):
        where, default_id = f"{path}:{line_no}", f"{path.stem}-{line_no - 1:03d}"
        try:
            if isinstance(row, ValueError):
                raise row
            if parquet and "problem" not in row:
                problem = _from_torl(row, where, default_id, path.stem)
            else:
                problem = _from_plain(row, where, default_id, path.stem)
            if problem.id in seen_ids:
                raise ValueError(f"{where}: id {problem.id!r} already used by an earlier row; ids must be unique")
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{e}; pass --skip-bad-rows to skip malformed rows (and count them)") from None
            skipped.append(str(e))
            continue
        seen_ids.add(problem.id)
        problems.append(problem)
    return LoadedProblems(problems, skipped)


def _text_key(text: str) -> str:
    return " ".join(text.split())


def find_duplicates(problems: list[Problem]) -> list[list[int]]:
    """Groups of indices (ascending, 2 or more each) of problems with the same text up to whitespace."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(_text_key(p.problem), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def drop_duplicates(problems: list[Problem]) -> list[Problem]:
    """The problems with every repeated text after its first occurrence removed (order kept)."""
    repeats = {i for group in find_duplicates(problems) for i in group[1:]}
    return [p for i, p in enumerate(problems) if i not in repeats]


def shared_sources(problems: list[Problem]) -> dict[str, list[str]]:
    """{id of the kept problem: its sources, in order} for each repeated problem whose rows have several sources
    (a problem that two benchmarks share, :func:`drop_duplicates` keeping the first)."""
    out = {}
    for group in find_duplicates(problems):
        sources = list(dict.fromkeys(problems[i].source for i in group))
        if len(sources) > 1:
            out[problems[group[0]].id] = sources
    return out


def _words(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def repeats_line(name: str, problems: list[Problem], per_source: bool = False) -> str | None:
    """One line on the repeated problems of the set ``name`` (None if there is none), e.g. "torl_test: 180 of 374
    rows repeat 60 problems (2 shared by aime24 and math500); each problem is evaluated and counted once" (see
    :func:`drop_duplicates`). ``per_source``: a shared problem counts in the row of each of its sources (eval.py)."""
    groups = find_duplicates(problems)
    if not groups:
        return None
    sharing = Counter(tuple(sources) for sources in shared_sources(problems).values())
    parts = [f"{n} by {_words(list(sources))}" for sources, n in sharing.most_common()]
    shared = f" ({', '.join(parts).replace(' by ', ' shared by ', 1)})" if parts else ""
    counted = ("evaluated once and counted in the row of each source that has it, once in 'all'" if per_source
               else "evaluated and counted once")
    repeats = sum(len(g) - 1 for g in groups)
    return f"{name}: {repeats} of {len(problems)} rows repeat {len(groups)} problems{shared}; each problem is {counted}"


def fit_positions(name: str, problems: list[Problem], lengths: list[int], budget: int, positions: int,
                  refuse: bool) -> tuple[list[Problem], str | None]:
    """(the problems whose prompt of ``lengths[i]`` tokens plus ``budget`` new tokens fit the model's
    ``positions`` (max_position_embeddings), the line that says how many of the set ``name`` were dropped and from
    which sources, or None); with ``refuse`` a ValueError that says the same instead of dropping them."""
    fits = [n + budget <= positions for n in lengths]
    over = [p for p, ok in zip(problems, fits, strict=True) if not ok]
    if not over:
        return problems, None
    sources = Counter(p.source or name for p in over)
    what = (f"{len(over)} of {len(problems)} problems of {name} ({', '.join(f'{s}: {k}' for s, k in sources.items())}) "
            f"have a prompt that, with the {budget} new tokens of the budget, passes the model's {positions} "
            f"positions (max_position_embeddings; the longest prompt has {max(lengths)} tokens)")
    if refuse:
        raise ValueError(f"{what}; drop them with --long-prompts drop, or lower --max-new-tokens")
    return [p for p, ok in zip(problems, fits) if ok], f"dropped {what}; --long-prompts refuse stops instead"


# ---------------------------------------------------------------------------------------- synthetic arithmetic


@dataclass(frozen=True)
class ArithmeticKind:
    """One family of problems: operands with the given digit counts joined by one operator (+, - or *)."""

    op: str
    digits: tuple[int, ...]
    weight: float = 1.0

    @property
    def name(self) -> str:
        return self.op.join(f"{d}d" for d in self.digits)


# Small problems a model can learn to answer directly, and large ones that need a calculator.
EASY_KINDS = (ArithmeticKind("+", (2, 2)), ArithmeticKind("*", (1, 2)), ArithmeticKind("-", (2, 1)))
HARD_KINDS = (ArithmeticKind("*", (3, 2)), ArithmeticKind("*", (3, 3)), ArithmeticKind("+", (3, 3, 3, 3)))
DEFAULT_KINDS = EASY_KINDS + HARD_KINDS

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_split(text: str, heldout_fraction: float) -> str:
    """'heldout' or 'train', decided by a hash of the problem text alone (so the splits never overlap)."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64
    return "heldout" if h < heldout_fraction else "train"


def arithmetic_problems(n: int, seed: int, split: str = "train", *, kinds: tuple[ArithmeticKind, ...] = DEFAULT_KINDS,
                        heldout_fraction: float = 0.2) -> list[Problem]:
    """`n` distinct problems like "What is 487 * 36?" with integer answers, the same list for the same arguments.

    Each problem's kind is drawn with probability proportional to `kind.weight`, its operands uniformly with
    the kind's digit counts (one-digit operands are 2..9); `source` is "arithmetic:<kind name>" (e.g. "arithmetic:3d*2d"). Problems whose
    text hashes into the other split are redrawn, so "train" and "heldout" lists are disjoint for any seeds.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    bad_ops = {k.op for k in kinds} - set(_OPS)
    if bad_ops:
        raise ValueError(f"unknown operator(s) {sorted(bad_ops)}; use {sorted(_OPS)}")
    rng = random.Random(seed)
    weights = [k.weight for k in kinds]
    problems, seen, attempts = [], set(), 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could only draw {len(problems)} distinct {split} problems of {n}; "
                             "add kinds with more digits")
        kind = rng.choices(kinds, weights)[0]
        operands = [rng.randint(10 ** (d - 1) if d > 1 else 2, 10**d - 1) for d in kind.digits]
        expr = f" {kind.op} ".join(map(str, operands))
        text = f"What is {expr}?"
        if text in seen or arithmetic_split(text, heldout_fraction) != split:
            continue
        seen.add(text)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        answer = reduce(_OPS[kind.op], operands)
        problems.append(Problem(id=f"arith-{digest}", problem=text, answer=str(answer), source=f"arithmetic:{kind.name}"))
    return problems
