"""Config fuzz: every field of the GADConfig tree gets a wrong type, an out-of-range value
(where it has a range) and a misspelled sibling key; each gives a one-line ConfigError
naming the full key, from load_config, before any process starts. The cases are generated
from the dataclass tree and the rule table (gad_megatron/config/rules.py), not listed by hand.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing

import psutil
import pytest
import yaml
from hypothesis import given, strategies as st

from tests import fuzz_profiles  # noqa: F401  (registers and loads the budget profile)

from gad_megatron.__main__ import main
from gad_megatron.config import ConfigError, GADConfig, load_config
from gad_megatron.config.rules import FREE_FIELDS, RULES, Choice, NonEmpty
from tests.reliability import record

pytestmark = pytest.mark.faults


def _base(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


def walk(cls, prefix: str = ""):
    """(full key, owning dataclass name, field name, type hint) of every leaf field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from walk(hints[f.name], key + ".")
        else:
            yield key, cls.__name__, f.name, hints[f.name]


def sections(cls, prefix: str = ""):
    """(path, field names) of the root and every nested dataclass."""
    hints = typing.get_type_hints(cls)
    yield prefix, [f.name for f in dataclasses.fields(cls)]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from sections(hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)


LEAVES = list(walk(GADConfig))
WRONG = {int: ["ten", 1.5, True, [1], {"a": 1}], float: ["fast", True, [0.1], float("nan")],
         bool: ["maybe", 2, [True]], str: [[1, 2], {"a": "b"}, True]}


def wrong_values(hint) -> list:
    base, _ = _base(hint)
    if typing.get_origin(base) is tuple:
        return [{"a": 1}, 5]
    if isinstance(base, type) and issubclass(base, str) and base is not str:  # Stage enum
        return ["no-such-stage", 3, [1]]
    return WRONG[base]


def nested(key: str, value) -> dict:
    tree: dict = {}
    node = tree
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return tree


def refusal(tmp_path, tree: dict) -> str:
    """The one-line ConfigError of loading `tree` as a YAML file; no process was started."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    message = str(err.value)
    assert "\n" not in message
    return message


def test_every_field_has_a_rule_or_is_declared_free():
    leaves = {(owner, name) for _, owner, name, hint in LEAVES
              if _base(hint)[0] in (int, float, str)}
    assert leaves - set(RULES) - FREE_FIELDS == set()  # a new field needs a decision
    assert set(RULES) | FREE_FIELDS <= {(o, n) for _, o, n, _ in LEAVES}  # no stale rule


@pytest.mark.parametrize("key, hint", [(k, h) for k, _, _, h in LEAVES], ids=[k for k, *_ in LEAVES])
def test_wrong_type_names_the_full_key(tmp_path, key, hint):
    for value in wrong_values(hint):
        message = refusal(tmp_path, nested(key, value))
        assert message.startswith(f"{key}: ") or message.startswith(f"{key}["), (value, message)


RANGED = [(k, RULES[(o, n)]) for k, o, n, _ in LEAVES if (o, n) in RULES]


@pytest.mark.parametrize("key, rule", RANGED, ids=[k for k, _ in RANGED])
def test_out_of_range_names_the_full_key(tmp_path, key, rule):
    for value in rule.outside():
        message = refusal(tmp_path, nested(key, value))
        assert message.startswith(f"{key}: "), message
        if isinstance(rule, Choice):
            assert str(list(rule.values)) in message
        elif not isinstance(rule, NonEmpty):
            assert f"must be {rule.describe()}, got" in message


def typo(name: str) -> str:
    if len(name) <= 3:
        return name + "x"
    mid = len(name) // 2
    return name[:mid] + name[mid + 1:]  # one letter left out


SECTIONS = list(sections(GADConfig))


@pytest.mark.parametrize("path, names", SECTIONS, ids=[p or "root" for p, _ in SECTIONS])
def test_misspelled_sibling_key_suggests_the_right_one(tmp_path, path, names):
    for name in names:
        wrong = typo(name)
        tree = nested(f"{path}.{wrong}" if path else wrong, 1)
        message = refusal(tmp_path, tree)
        assert message.startswith(f"unknown key '{wrong}' in {path or 'config'}; did you mean "
                                  f"'{name}'?"), message
        assert all(n in message for n in names)  # the known keys are listed


def test_brief_example_and_aliases(tmp_path):
    msg = refusal(tmp_path, {"actor": {"optim": {"lerning_rate": 1e-5}}})
    assert msg.startswith("unknown key 'lerning_rate' in actor.optim; did you mean 'lr'?")
    assert refusal(tmp_path, {"rollout": {"num_samples": 4}}).startswith(
        "unknown key 'num_samples' in rollout; did you mean 'n'?")
    assert "did you mean" not in refusal(tmp_path, {"train": {"zzzz": 1}})


@pytest.mark.parametrize("override, line, fault", [
    ("actor.optim.lr=-1", "error: actor.optim.lr: must be > 0, got -1.0",
     "config: out-of-range value (actor.optim.lr=-1)"),
    ("train.steps=ten", "error: train.steps: expected int, got 'ten'",
     "config: wrong type (train.steps=ten)"),
    ("actor.optim.lerning_rate=1e-5", "error: unknown key 'lerning_rate' in actor.optim; did "
     "you mean 'lr'?", "config: misspelled key (actor.optim.lerning_rate)"),
    ("rollout.top_p=nan", "error: rollout.top_p: must be a finite number, got nan",
     "config: NaN for a float (rollout.top_p=nan)"),
    ("data.train_files=[a.jsonl,", "error: override 'data.train_files=[a.jsonl,': not a valid "
     "YAML list or mapping", "config: an unclosed list override (data.train_files=[a.jsonl,)"),
])
def test_cli_refuses_in_one_line_before_any_process(tmp_path, capsys, override, line, fault):
    out = tmp_path / "run"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    t0 = time.monotonic()
    assert main(["train", "configs/default.yaml", f"run.out_dir={out}", override]) == 1
    seconds = time.monotonic() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert not out.exists()
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    record(fault, err[0], seconds, "nothing: no process started, no run directory written")


# A random tree of real and made-up keys with values of any YAML type.
yaml_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=4), c, max_size=2),
    max_leaves=4)
key_st = st.sampled_from([k for k, *_ in LEAVES]) | st.sampled_from(
    [p for p, _ in SECTIONS if p]) | st.text(st.sampled_from("abcdlrt._"), min_size=1, max_size=8)


@given(st.dictionaries(key_st, yaml_value, max_size=4))
def test_random_overrides_give_a_config_or_one_line_error(items):
    tree: dict = {}
    for key, value in items.items():
        parts = [p for p in key.split(".") if p] or ["x"]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[parts[-1]] = value
    try:
        from gad_megatron.config.loader import build

        cfg = build(GADConfig, tree)
        assert isinstance(cfg, GADConfig)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).split(":")[0], exc


def test_an_unknown_key_with_a_newline_stays_one_line(tmp_path):
    """Found by the long fuzz (`make fuzz`): the key was printed raw."""
    assert refusal(tmp_path, {"run": {"\n": None}}).startswith(r"unknown key '\n' in run")


# Lists as users of Hydra, OmegaConf and verl write them (issue 26): bare commas, `[a,b]`,
# and the quoted Python-style list a shell passes on as `['a','b']`.
LIST_LEAVES = [k for k, _, _, hint in LEAVES if typing.get_origin(_base(hint)[0]) is tuple]
word = st.from_regex(r"[a-z][a-z0-9_./-]{0,7}", fullmatch=True).filter(
    lambda w: yaml.safe_load(w) == w)  # not a YAML keyword such as `no` or `null`


def _outcome(override: str):
    from gad_megatron.config.loader import build, parse_overrides

    try:
        return build(GADConfig, parse_overrides([override]))
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return str(exc)


@given(st.sampled_from(LIST_LEAVES), st.lists(word, min_size=1, max_size=3))
def test_a_list_override_means_the_same_in_every_form(key, items):
    forms = [",".join(items), "[" + ",".join(items) + "]",
             "[" + ", ".join(f"'{w}'" for w in items) + "]", '"' + str(list(items)) + '"']
    first, *rest = [_outcome(f"{key}={form}") for form in forms]
    for form, other in zip(forms[1:], rest):
        assert other == first, (form, other, first)


def test_list_and_mapping_overrides_in_flow_form(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for form in (f"[{a},{b}]", f"['{a}','{b}']", f"\"['{a}', '{b}']\"", f"{a},{b}"):
        cfg = load_config("configs/default.yaml", [f"data.train_files={form}"])
        assert cfg.data.train_files == (str(a), str(b)), form
    cfg = load_config("configs/default.yaml", ["actor.optim={lr: 0.002, weight_decay: 0.1}"])
    assert (cfg.actor.optim.lr, cfg.actor.optim.weight_decay) == (0.002, 0.1)
    with pytest.raises(ConfigError, match=r"^override 'data.train_files=\[a,': not a valid YAML"):
        load_config("configs/default.yaml", ["data.train_files=[a,"])
    with pytest.raises(ConfigError, match=r"actor.optim.lr: expected float"):
        load_config("configs/default.yaml", ["actor.optim.lr=[1,2]"])
