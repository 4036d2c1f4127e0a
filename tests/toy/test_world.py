"""The toy world: tokenizer round trip, verifiers, data splits, teachers beating the student."""
import json
import random

import pyarrow.parquet as pq
import pytest

from opd_tasks.config import RunConfig, load_config
from opd_tasks.evaluate import greedy_accuracy
from opd_tasks.toy.world import build_world, resolve, resolve_config
from opd_tasks.verifiers import exact, get_verifier, normalize


def test_tokenizer_round_trips_through_autotokenizer(toy_world):
    from transformers import AutoTokenizer
    from opd_tasks.toy.tokenizer import build_tokenizer
    built = build_tokenizer()
    for where in ("tokenizer", "student", "teachers/add"):
        tok = AutoTokenizer.from_pretrained(toy_world / where)
        assert tok.padding_side == "left" and tok.eos_token_id is not None and tok.pad_token_id is not None
        rng = random.Random(0)
        for _ in range(200):
            text = "".join(rng.choices("add rev 0123456789+=abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 20)))
            assert tok(text)["input_ids"] == built(text)["input_ids"]
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text


@pytest.mark.parametrize("response, answer, ok", [
    ("579", "579", 1.0), (" 579 <eos>", "579", 1.0), ("579<eos><pad>", "579", 1.0),
    ("578", "579", 0.0), ("5790", "579", 0.0), ("", "579", 0.0),
])
def test_verifiers(response, answer, ok):
    assert get_verifier("add")(response, answer) == ok
    assert get_verifier("rev")(response, answer) == ok
    assert get_verifier(None) is exact and normalize(" x <eos>") == "x"


def test_data_splits_are_disjoint_with_the_right_columns(toy_world):
    train, ev = (pq.read_table(toy_world / "data" / f"{s}.parquet") for s in ("train", "eval"))
    for t in (train, ev):
        assert {"prompt_id", "prompt", "answer", "domain"} <= set(t.column_names)
        assert set(t.column("domain").to_pylist()) == {"add", "rev"}
    assert not set(train.column("prompt").to_pylist()) & set(ev.column("prompt").to_pylist())
    for row in ev.to_pylist()[:50]:
        body = row["prompt"].split(" ", 1)[1].rstrip("=")
        if row["domain"] == "rev":
            assert row["answer"] == body[::-1]
        else:
            a, b = body.split("+")
            assert int(row["answer"]) == int(a) + int(b)


def test_teachers_beat_the_student_on_their_domain_and_world_json_is_honest(toy_world):
    world = json.loads((toy_world / "world.json").read_text())
    acc = world["accuracy"]
    for name, t in world["teachers"].items():
        d = t["domain"]
        assert acc[name][d] - acc["student"][d] >= 0.2, (name, acc)
    rows = pq.read_table(toy_world / "data" / "eval.parquet").to_pylist()
    assert greedy_accuracy(world["teachers"]["adder"]["path"], rows,
                           max_new_tokens=world.get("eval", {}).get("max_new_tokens", 8)) == \
        pytest.approx(acc["adder"], abs=1e-9)


def test_cached_world_is_reused(toy_world, toy_world_cfg):
    before = (toy_world / "world.json").stat().st_mtime_ns
    assert build_world(toy_world_cfg.dir, size="test", seed=0) == toy_world
    assert (toy_world / "world.json").stat().st_mtime_ns == before


def test_toy_uris_resolve_and_the_shipped_config_resolves(toy_world, toy_world_cfg):
    assert resolve("toy://student", toy_world_cfg) == str(toy_world / "student")
    cfg = load_config(__import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "toy.yaml")
    cfg = cfg.model_copy(update={"toy_world": toy_world_cfg})
    res = resolve_config(cfg)
    assert isinstance(res, RunConfig) and res.teachers[0].path.startswith(str(toy_world))
    assert res.data.train.endswith("train.parquet") and "toy://" not in res.to_yaml()
