"""The training config: flat flags generated from the nested dataclasses (one per field, names unique across the
tree), presets underneath them, and the refusal of a field name used twice."""
from dataclasses import dataclass, field, fields, is_dataclass

import pytest

from nanotorl.config import PRESETS, TrainConfig, flag_fields, parse_args

CHOICES = {"aggregation": "sequence", "trigger": "output", "dtype": "bfloat16",  # str fields with a meaning
           "compat": "torl"}
IMPLIED = {"compat": {("rollout", "trigger")}}  # --compat torl also sets ToRL's trigger
BOUNDED = {"tool_failure_limit": 0.5}  # number fields with a range: another value inside it


def leaves(cfg, path=()):
    """(path, value) of every non-dataclass field, walked independently of nanotorl.config."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        yield from leaves(value, path + (f.name,)) if is_dataclass(value) else [(path + (f.name,), value)]


def get(cfg, path):
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def other_value(name, value):
    """A value of the same type as ``value`` but different, and its command-line spelling."""
    if isinstance(value, bool):
        return (not value), str(not value).lower()
    if name in BOUNDED:
        return BOUNDED[name], str(BOUNDED[name])
    if isinstance(value, (int, float)):
        return value + 3, str(value + 3)
    return CHOICES.get(name, "x/y"), CHOICES.get(name, "x/y")


def test_field_names_are_unique_across_the_nested_dataclasses():
    names = [path[-1] for path, _ in leaves(TrainConfig())]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert {p for p, _ in leaves(TrainConfig())} == {p for p, _ in flag_fields().values()}


@pytest.mark.parametrize("path", [p for p, _ in leaves(TrainConfig())], ids=lambda p: ".".join(p))
def test_every_field_has_its_flat_flag(path):
    value, text = other_value(path[-1], get(TrainConfig(), path))
    cfg = parse_args(["--" + path[-1].replace("_", "-"), text])
    assert get(cfg, path) == value
    changed = [p for p, v in leaves(cfg) if v != get(TrainConfig(), p)]
    assert set(changed) == {path} | IMPLIED.get(path[-1], set())  # that field only, wherever it is nested


def test_flags_override_the_preset_and_keep_the_rest():
    cfg = parse_args(["--preset", "torl-1.5b", "--clip-high", "0.28", "--max-tool-calls", "2",
                      "--skip-bad-rows", "true", "--aggregation", "sequence"])
    preset = PRESETS["torl-1.5b"]
    assert (cfg.grpo.clip_high, cfg.rollout.max_tool_calls, cfg.inputs.skip_bad_rows) == (0.28, 2, True)
    assert (cfg.grpo.aggregation, cfg.grpo.group_size, cfg.optim.lr) == ("sequence", 16, 1e-6)
    assert (cfg.log.out_dir, cfg.rollout.max_new_tokens) == (preset.log.out_dir, 3072)
    assert preset.grpo.clip_high == 0.2 and preset.grpo.aggregation == "token"  # the preset itself is untouched
    assert parse_args([]) == PRESETS["demo"] == TrainConfig()


def test_bad_values_are_refused_with_the_reason(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--std-normalize", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="aggregation must be 'token', 'sequence' or 'constant'"):
        parse_args(["--aggregation", "mean"])


SAFEGUARDS = {"--tool-failure-limit": ("0.1", ("rollout", "tool_failure_limit"), 0.1),
              "--max-tool-calls": ("3", ("rollout", "max_tool_calls"), 3),
              "--aggregation": ("constant", ("grpo", "aggregation"), "constant"),
              "--dual-clip": ("3", ("grpo", "dual_clip"), 3.0),
              "--mask-truncated": ("true", ("grpo", "mask_truncated"), True),
              "--filter-void-turns": ("true", ("grpo", "filter_void_turns"), True),
              "--skip-bad-rows": ("true", ("inputs", "skip_bad_rows"), True),
              "--debug": ("true", ("log", "debug"), True)}


def test_the_safeguard_flags_are_in_the_help_and_parsed(capsys):
    """Issue 14's flags, spelled as there, in ``python train.py --help`` (the same parser) and parsed together."""
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    listed = capsys.readouterr().out.split()
    assert [flag for flag in SAFEGUARDS if flag not in listed] == []
    cfg = parse_args([part for flag, (text, _, _) in SAFEGUARDS.items() for part in (flag, text)])
    assert {flag: get(cfg, path) for flag, (_, path, _) in SAFEGUARDS.items()} == {
        flag: value for flag, (_, _, value) in SAFEGUARDS.items()}


def test_a_field_name_used_twice_is_refused():
    @dataclass
    class Inner:
        seed: int = 1

    @dataclass
    class Outer:
        seed: int = 0
        inner: Inner = field(default_factory=Inner)

    with pytest.raises(ValueError, match="'seed' is both seed and inner.seed"):
        flag_fields(Outer())


def test_compat_torl_sets_torls_trigger_unless_one_is_given():
    """--compat torl is one switch: it sets --trigger output (the torl-* presets set both); an explicit --trigger
    is kept (the Generator then refuses the contradiction), in train.py's flags and in eval.py's alike."""
    import eval as ev
    assert PRESETS["torl-1.5b"].rollout.compat == "torl" and PRESETS["torl-1.5b"].rollout.trigger == "output"
    assert parse_args(["--compat", "torl"]).rollout.trigger == "output"
    assert parse_args(["--compat", "torl", "--trigger", "fence"]).rollout.trigger == "fence"
    assert (ev.parse_args(["--compat", "torl"]).trigger, ev.parse_args([]).trigger) == ("output", "fence")
    with pytest.raises(ValueError, match="--compat must be one of"):
        parse_args(["--compat", "torl2"])
