"""Safe loading (opd_tasks.models): safetensors only, code shipped with a model only when the config
asks (and logged), DCP train state (a pickle) only from the run's own checkpoints."""
import json
import logging
import shutil

import pytest
import torch

from opd_tasks.errors import ModelPathError
from opd_tasks.models import load_causal_lm, load_config, load_for_training, load_tokenizer, remote_code
from opd_tasks.trainer import TrainError
from opd_tasks.trainer.worker import resolve_init

AUTO_MAP = {"AutoConfig": "custom.MyConfig", "AutoModelForCausalLM": "custom.MyModel"}


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _set(path, name: str, **items) -> None:
    f = path / name
    f.write_text(json.dumps({**json.loads(f.read_text()), **items}))


def test_only_safetensors_weights_are_loaded(tmp_path, tiny_world):
    d = tmp_path / "pickled"
    _copy(tiny_world["student"], d)
    from safetensors.torch import load_file
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    for load in (load_causal_lm, load_for_training):
        with pytest.raises(ModelPathError, match=r"pickled'.*no \*\.safetensors weights \(it has \['pytorch_model"
                                                 r"\.bin'\]: pickles, .*safe_serialization=True"):
            load(str(d))


def test_code_shipped_with_a_model_runs_only_when_the_config_asks(tmp_path, tiny_world, caplog):
    d = tmp_path / "custom"
    _copy(tiny_world["student"], d)
    _set(d, "config.json", auto_map=AUTO_MAP)
    with pytest.raises(ModelPathError, match=r"student .*custom': config.json name code shipped with the model "
                                             r"\(auto_map\); .*set student.trust_remote_code: true"):
        load_causal_lm(str(d), role="student")
    with pytest.raises(ModelPathError, match=r"teachers\[\]\.trust_remote_code \(teacher 'tx'\): true"):
        load_config(str(d), role="teacher 'tx'")
    with pytest.raises(ModelPathError, match=r"reference.trust_remote_code: true"):
        load_for_training(str(d), role="reference")
    load_tokenizer(str(d))  # the model's code, not the tokenizer's: the tokenizer needs none
    _set(d, "tokenizer_config.json", auto_map={"AutoTokenizer": ["custom.MyTok", None]})
    with pytest.raises(ModelPathError, match=r"tokenizer_config.json name code shipped"):
        load_tokenizer(str(d), role="student")
    with caplog.at_level(logging.WARNING, logger="opd.models"):
        assert remote_code(str(d), True, "student") is True
    assert "trust_remote_code=True for student" in caplog.text and "custom" in caplog.text


def test_dcp_state_is_loaded_only_from_the_runs_own_checkpoints(tmp_path):
    def checkpoint(path):
        (path / "dcp").mkdir(parents=True)
        (path / "_MANIFEST.json").write_text("{}")
        return str(path)

    own = checkpoint(tmp_path / "run" / "checkpoints" / "iter-000000")
    out = str(tmp_path / "run" / "checkpoints" / "iter-000001")
    assert resolve_init(own, out) == (own + "/hf", own + "/dcp")
    foreign = checkpoint(tmp_path / "elsewhere" / "iter-000007")
    with pytest.raises(TrainError, match=r"elsewhere/iter-000007: DCP train state is loaded only from this run's "
                                         r"own checkpoints \(.*run/checkpoints\): its dcp/.metadata is a pickle"):
        resolve_init(foreign, out)
