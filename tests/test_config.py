from pathlib import Path

import pytest

from opd_tasks.config import ConfigError, RunConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def minimal(**over):
    data = {
        "student": {"path": "toy://student"},
        "teachers": [{"name": "a", "path": "toy://teachers/add", "domain": "add"},
                     {"name": "b", "path": "toy://teachers/rev", "domain": "rev"}],
        "data": {"train": "toy://data/train.parquet"},
    }
    data.update(over)
    return data


@pytest.mark.parametrize("name", ["toy.yaml", "qwen3-8gpu.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, RunConfig)
    assert len(cfg.config_hash()) == 16


def test_invalid_literal_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as exc:
        parse_config(minimal(loss={"kind": "kl"}), "x.yaml")
    msg = str(exc.value)
    assert "x.yaml" in msg and "loss.kind" in msg
    for allowed in ("'rkl'", "'gopd'", "'kdrl'"):
        assert allowed in msg


def test_unknown_field_is_rejected_with_its_path():
    with pytest.raises(ConfigError, match=r"rollout\.temprature: unknown field"):
        parse_config(minimal(rollout={"temprature": 0.7}))


@pytest.mark.parametrize("weights, match", [
    ([-1.0, 1.0], "weight must be finite and >= 0"),
    ([float("nan"), 1.0], "weight must be finite and >= 0"),
    ([0.0, 0.0], "weights are all zero"),
])
def test_bad_teacher_weights(weights, match):
    d = minimal()
    for t, w in zip(d["teachers"], weights):
        t["weight"] = w
    with pytest.raises(ConfigError, match=match):
        parse_config(d)


def test_duplicate_teacher_names():
    d = minimal()
    d["teachers"][1]["name"] = "a"
    with pytest.raises(ConfigError, match="names must be unique"):
        parse_config(d)


def test_route_needs_domains():
    d = minimal(combination="route")
    d["teachers"][0]["domain"] = None
    with pytest.raises(ConfigError, match=r"teachers \['a'\] have no domain"):
        parse_config(d)


def test_teacher_name_must_be_a_safe_identifier():
    d = minimal()
    d["teachers"][0]["name"] = "../evil"
    with pytest.raises(ConfigError, match=r"teachers\.0\.name"):
        parse_config(d)


def test_lambda_alias_and_reference_need():
    cfg = parse_config(minimal(loss={"kind": "gopd", "lambda": 1.25}))
    assert cfg.loss.lam == 1.25 and cfg.needs_reference
    assert not parse_config(minimal(loss={"kind": "gopd", "lambda": 1.0})).needs_reference
    assert "lambda: 1.25" in cfg.to_yaml()


def test_config_hash_ignores_mutable_fields_only():
    a = parse_config(minimal(iterations=3))
    b = parse_config(minimal(iterations=9))
    c = parse_config(minimal(iterations=3, seed=1))
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != c.config_hash()


def test_kdrl_with_no_weights_rejected():
    with pytest.raises(ConfigError, match="trains nothing"):
        parse_config(minimal(loss={"kind": "kdrl", "w_rl": 0, "w_kd": 0}))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_pure_kd_does_not_keep_the_tiny_joint_weight():
    assert parse_config(minimal(loss={"kind": "kdrl", "w_rl": 0})).loss.w_kd == 1.0
    assert parse_config(minimal(loss={"kind": "kdrl"})).loss.w_kd == 0.005
    assert parse_config(minimal(loss={"kind": "kdrl", "w_rl": 0, "w_kd": 0.1})).loss.w_kd == 0.1


def test_topk_loss_needs_scoring_top_k_and_refuses_product():
    from opd_tasks.config import ConfigError, parse_config
    base = {"student": {"path": "s"}, "teachers": [{"name": "a", "path": "a"}], "data": {"train": "d"}}
    with pytest.raises(ConfigError, match="scoring.top_k"):
        parse_config({**base, "loss": {"kind": "topk"}})
    with pytest.raises(ConfigError, match="combination=product"):
        parse_config({**base, "loss": {"kind": "topk"}, "scoring": {"top_k": 8}, "combination": "product"})
    with pytest.raises(ConfigError, match="loss.beta"):
        parse_config({**base, "loss": {"kind": "topk", "divergence": "jsd", "beta": 1.0}, "scoring": {"top_k": 8}})
    ok = parse_config({**base, "loss": {"kind": "topk", "divergence": "jsd"}, "scoring": {"top_k": 8}})
    assert ok.loss.beta == 0.5 and ok.loss.tail and ok.scoring.top_k == 8
    assert parse_config(base).config_hash() == parse_config({**base, "scoring": {"top_k": 0},
                                                             "loss": {"sampled_weight": 0.0}}).config_hash()


def test_read_yaml_gives_what_safe_load_gives():
    """read_yaml (libyaml when PyYAML has it) parses every shipped config, and a run.yaml written by
    RunConfig.to_yaml, into exactly the objects yaml.safe_load makes (types included)."""
    import yaml

    from opd_tasks.config import read_yaml

    texts = [p.read_text() for p in sorted((ROOT / "configs").glob("*.yaml"))]
    texts.append(load_config(ROOT / "configs" / "toy.yaml").to_yaml())
    texts.append("a: 1.0e-5\nb: [1, 2.5, null, true, '007', 0o17, .inf]\nc: {d: ~, e: 2026-01-02}\n")
    for text in texts:
        a, b = read_yaml(text), yaml.safe_load(text)
        assert a == b and repr(a) == repr(b)
