"""Prompts -> token ids, one way: chat template (messages column or data.chat_template) gives the same
ids in rollout, offline datasets and evaluation (scoring and training read the rollout's stored ids);
prompt-length limits come from the engines' max_model_len; bad input names the field."""
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd_tasks.config import RolloutConfig, ScoringConfig, parse_config
from opd_tasks.context import prepare_run
from opd_tasks.errors import DataError
from opd_tasks.models import load_tokenizer
from opd_tasks.prompts import encode_prompts, prompt_limit
from storage.datasets import read_prompts
from tiny_world import tiny_config

# letters only (the tiny tokenizer has one token per letter): role initial, content; then "z" opens the answer
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}z{% endif %}")


@pytest.fixture()
def chat_world(tiny_world, tmp_path):
    """The tiny world whose student tokenizer has a chat template, and a prompt set with a messages
    column (one row of plain text, the rest chat)."""
    student = tmp_path / "student"
    shutil.copytree(tiny_world["student"], student)
    tok = load_tokenizer(student)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(student)
    rows = [{"prompt_id": f"q{i}", "prompt": "abc" if i == 0 else None, "answer": "ab", "domain": "xy"[i % 2],
             "messages": None if i == 0 else [{"role": "system", "content": "gh"}, {"role": "user", "content": "cd" * i}]}
            for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    return {**tiny_world, "student": str(student), "prompts": str(tmp_path / "chat.parquet")}


def _expected(tok, text: str) -> list[int]:
    """By hand: BOS, one id per letter."""
    return [tok.bos_token_id] + tok.convert_tokens_to_ids(list(text))


def test_chat_template_ids_are_the_same_in_rollout_offline_and_eval(chat_world, tmp_path, monkeypatch):
    import opd_tasks.rollout as rollout
    from opd_tasks.eval_stage import eval_prompts, student_accuracy
    from opd_tasks.offline.dataset import to_rollout_table
    from storage.shards import read_stage

    cfg = parse_config(tiny_config(chat_world, data={"chat_template": True},
                                   rollout={"prompts_per_iteration": 8, "group_size": 1}))
    ctx = prepare_run(cfg, str(tmp_path / "run"))
    tok = load_tokenizer(chat_world["student"])
    want = {"q0": _expected(tok, "uabcz")} | {f"q{i}": _expected(tok, "sgh" + "u" + "cd" * i + "z") for i in range(1, 8)}
    rows = read_prompts(chat_world["prompts"])
    assert dict(zip(rows.column("prompt_id").to_pylist(), encode_prompts(tok, rows, True, "x"))) == want
    # without data.chat_template, plain text is tokenized as before (this tokenizer adds no BOS itself)
    assert encode_prompts(tok, rows.slice(0, 1), False, "x") == [tok.convert_tokens_to_ids(list("abc"))]

    rollout.run_rollout(ctx, 0)
    shard = read_stage(ctx.layout.fs, ctx.stage_dir(0, "rollout"))
    assert dict(zip(shard.column("prompt_id").to_pylist(), shard.column("prompt_ids").to_pylist())) == want

    seen = []

    class Recording:  # the rollout engine, recording what evaluation sends it
        def generate(self, prompt_ids, n, sampling):
            seen.extend(list(p) for p in prompt_ids)
            assert n == 1 and sampling.temperature == 0
            return real.generate(prompt_ids, n, sampling)
    real = rollout.get_generator(ctx, chat_world["student"])
    monkeypatch.setattr(rollout, "get_generator", lambda ctx, path: Recording())
    acc = student_accuracy(ctx, chat_world["student"], eval_prompts(ctx))
    assert set(acc) == {"x", "y"} and sorted(seen) == sorted(want.values())

    offline = rows.append_column("response", pa.array(["ab"] * rows.num_rows))
    table, how = to_rollout_table(offline, tok, "offline.parquet", chat_template=True)
    assert table.column("prompt_ids").to_pylist() == [want[p] for p in rows.column("prompt_id").to_pylist()]
    assert how["chat_template"] is True


def test_chat_prompt_errors_name_the_field(tiny_world, tmp_path):
    tok = load_tokenizer(tiny_world["student"])  # no chat template
    with pytest.raises(DataError, match=r"data\.chat_template.*has none") as err:
        encode_prompts(tok, [{"prompt": "ab"}], True, "train.parquet")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="need a chat template.*messages column"):
        encode_prompts(tok, [{"messages": [{"role": "user", "content": "ab"}]}], False, "train.parquet")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=r"row 0, message 0 of column 'messages' lacks a role or content"):
        read_prompts(str(bad))
    bad.write_text('{"messages": "hello"}\n')
    with pytest.raises(DataError, match=r"column 'messages' must hold a list of \{role, content\}"):
        read_prompts(str(bad))
    bad.write_text('{"answer": "1"}\n')
    with pytest.raises(DataError, match=r"missing required column 'prompt'.*\(or a chat column named messages\)"):
        read_prompts(str(bad))


def test_prompt_limit_is_the_engines_max_model_len_minus_max_new_tokens(tiny_world):
    student = tiny_world["student"]  # max_position_embeddings=128
    hf, vllm = RolloutConfig(), RolloutConfig(engine="vllm", vllm={"max_model_len": 40})
    assert prompt_limit([(student, hf)], 32, "rollout.max_new_tokens") == \
        (96, f"max_position_embeddings=128 of {student} - rollout.max_new_tokens=32")
    assert prompt_limit([(student, vllm)], 32, "rollout.max_new_tokens")[0] == 8
    # the smallest context wins: here the teachers' scoring engine
    scoring = ScoringConfig(engine="vllm", vllm={"max_model_len": 36})
    limit, why = prompt_limit([(student, vllm), (tiny_world["tx"], scoring)], 32, "rollout.max_new_tokens")
    assert (limit, why) == (4, "scoring.vllm.max_model_len=36 - rollout.max_new_tokens=32")
    tok = load_tokenizer(student)
    with pytest.raises(DataError, match=r"prompt 'p1' has 5 tokens, but the model's context leaves 4 .*"
                                        r"\(the limit: scoring\.vllm\.max_model_len=36 - rollout\.max_new_tokens=32\)"):
        encode_prompts(tok, [{"prompt": "ab", "prompt_id": "p0"}, {"prompt": "abcde", "prompt_id": "p1"}], False,
                       "train.parquet", limit=limit, limit_why=why)
    with pytest.raises(DataError, match="no room left for a prompt"):
        encode_prompts(tok, [{"prompt": "ab"}], False, "train.parquet", limit=0, limit_why=why)


def test_rollout_refuses_prompts_longer_than_vllm_max_model_len(tiny_world, tmp_path):
    """The stage's check uses the rollout engine's max_model_len (before any engine is built)."""
    from opd_tasks.rollout import run_rollout
    cfg = parse_config(tiny_config(tiny_world, rollout={"engine": "vllm", "vllm": {"max_model_len": 9}}))
    ctx = prepare_run(cfg, str(tmp_path / "run"))
    with pytest.raises(DataError, match=r"rollout\.vllm\.max_model_len=9 - rollout\.max_new_tokens=6"):
        run_rollout(ctx, 0)
