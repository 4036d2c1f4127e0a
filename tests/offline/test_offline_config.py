"""The `offline:` block: defaults, validation errors that name the field, and config identity
(a config without the block hashes exactly as before the block existed)."""
import pytest
import yaml

from opd_tasks.config import ConfigError, parse_config


def minimal(**over) -> dict:
    d = {"student": {"path": "s"},
         "teachers": [{"name": "adder", "path": "a", "domain": "add"}, {"name": "reverser", "path": "r", "domain": "rev"}],
         "combination": "route", "data": {"train": "t.parquet"}}
    d.update(over)
    return d


def test_defaults_and_an_absent_block():
    assert parse_config(minimal()).offline is None
    off = parse_config(minimal(offline={})).offline
    assert (off.source, off.generate.model, off.generate.prompts, off.generate.group_size) == ("generate", "route", 256, 1)
    assert (off.loss, off.epochs, off.mini_batches, off.lr) == ("sft", 1, 4, None)
    assert off.filter.min_reward is None and off.filter.min_teacher_logp_per_token is None


def test_an_absent_block_keeps_the_config_hash_of_runs_made_before_it():
    """Pinned: this config hashed to 7118e3b0d4f0b29b before the offline block and train.old_logp
    existed; both are left out of the hash while they hold their defaults."""
    cfg = parse_config(minimal())
    assert cfg.config_hash() == "7118e3b0d4f0b29b"
    assert parse_config(minimal(train={"old_logp": "auto"})).config_hash() == "7118e3b0d4f0b29b"
    assert parse_config(minimal(train={"old_logp": "recompute"})).config_hash() != "7118e3b0d4f0b29b"
    assert "offline" not in yaml.safe_load(cfg.to_yaml())
    assert "old_logp" not in yaml.safe_load(cfg.to_yaml())["train"]
    with_block = parse_config({**yaml.safe_load(cfg.to_yaml()), "offline": {}})
    assert with_block.config_hash() != cfg.config_hash()
    assert parse_config(yaml.safe_load(with_block.to_yaml())).config_hash() == with_block.config_hash()


@pytest.mark.parametrize("offline, match", [
    ({"source": "dataset"}, r"offline.source=dataset needs offline.dataset"),
    ({"dataset": "d.parquet"}, r"offline.dataset is read only with offline.source: dataset"),
    ({"generate": {"model": "nobody"}}, r"offline.generate.model: 'nobody' is not a teacher; use one of \['adder', 'reverser'\]"),
    ({"epochs": 0}, r"offline.epochs"),
    ({"generate": {"prompts": 0}}, r"offline.generate.prompts"),
    ({"filter": {"min_teacher_logp_per_token": 0.5}}, r"offline.filter.min_teacher_logp_per_token"),
    ({"lr": -1}, r"offline.lr"),
    ({"los": "sft"}, r"offline.los: unknown field"),
    ({"loss": "rkl"}, r"offline.loss"),
])
def test_bad_blocks_are_refused_naming_the_field(offline, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(minimal(offline=offline), "x.yaml")


def test_route_generation_needs_every_teacher_to_have_a_domain():
    d = minimal(combination="mixture", offline={"generate": {"model": "route"}})
    d["teachers"][1]["domain"] = None
    with pytest.raises(ConfigError, match=r"offline.generate.model=route: teachers \['reverser'\] have no domain"):
        parse_config(d)
    d["offline"]["generate"]["model"] = "adder"  # one named teacher needs no domains
    assert parse_config(d).offline.generate.model == "adder"


def test_a_dataset_source_does_not_check_the_generation_model():
    off = parse_config(minimal(offline={"source": "dataset", "dataset": "d.jsonl", "generate": {"model": "x"}})).offline
    assert off.dataset == "d.jsonl"


def test_more_offline_prompts_than_the_set_is_refused_not_wrapped():
    """Wrapping gave two samples one sample id (off-TEACHER-PROMPT-gG) and broke the filter check."""
    import pyarrow as pa

    from opd_tasks.offline.generate import offline_prompts
    from storage.errors import DataError
    table = pa.table({"prompt": ["a", "b", "c"], "prompt_id": ["p0", "p1", "p2"]})
    assert sorted(offline_prompts(table, 0, 3).column("prompt_id").to_pylist()) == ["p0", "p1", "p2"]
    assert offline_prompts(table, 0, 2).num_rows == 2
    with pytest.raises(DataError, match=r"offline.generate.prompts=4 exceeds the 3 prompts.*group_size"):
        offline_prompts(table, 0, 4)
