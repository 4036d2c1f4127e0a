"""Lean loading (models.load_for_training): parameters built empty on the meta device, each rank
reads only its own shard from the safetensors files. The weights must be exactly today's
from_pretrained(dtype=float32) load: at 1 rank (plain module) and at 2 ranks (FSDP2, uneven shards)."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from train_helpers import one_torch_thread  # noqa: F401 - autouse fixture: one torch thread per test

from opd_tasks.errors import ModelPathError
from opd_tasks.models import load_for_training


def _model_dir(path, tie: bool, dtype=torch.float32, vocab: int = 41) -> str:
    """A random Llama whose dims do not split evenly over 2 ranks (vocab 41, 3 heads x 16 = 48 hidden)."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=75, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(7)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    return str(path)


def _today(path) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


@pytest.mark.parametrize("tie, dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)],
                         ids=["untied", "tied", "bf16-files"])
def test_one_rank_lean_load_equals_from_pretrained(tmp_path, tie, dtype):
    path = _model_dir(tmp_path / "m", tie, dtype)
    model = load_for_training(path, "float32")
    assert model.training and not any(p.is_meta for p in model.parameters())
    got = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    want = _today(path)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    x = torch.randint(0, 41, (2, 7))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert torch.equal(model(x).logits, ref(x).logits)


def test_weights_that_do_not_fit_the_config_name_the_directory(tmp_path):
    path = _model_dir(tmp_path / "m", tie=False)
    from safetensors.torch import load_file, save_file
    state = load_file(os.path.join(path, "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelPathError, match=r"lack \['model.norm.weight'\]"):
        load_for_training(path)


def _rank(rank: int, paths: list[str], init: str, out: str) -> None:
    import torch.distributed as dist
    from opd_tasks.trainer.checkpoint import full_state_dict
    from opd_tasks.trainer.distributed import init_distributed, shard_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    d = init_distributed("cpu")
    fulls = []
    for path in paths:
        model = load_for_training(path, prepare=lambda m: shard_model(m, d.mesh))
        want = _today(path)
        # this rank's shard of every parameter is its slice of today's full tensor (torch.chunk on dim 0)
        for name, p in model.named_parameters():
            local = p.to_local()
            chunk = want[name].chunk(2, dim=0)
            expect = chunk[rank] if rank < len(chunk) else want[name][:0]
            assert torch.equal(local, expect), (rank, name)
        fulls.append({k: v.clone() for k, v in full_state_dict(model).items()})
    if rank == 0:
        torch.save(fulls, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_each_materialize_their_shard_equal_to_from_pretrained(tmp_path):
    paths = [_model_dir(tmp_path / "untied", tie=False), _model_dir(tmp_path / "tied", tie=True)]
    out = str(tmp_path / "full.pt")
    mp.spawn(_rank, args=(paths, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    for path, full in zip(paths, torch.load(out, weights_only=True)):
        want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
        assert sorted(full) == sorted(want)
        for k, v in want.items():
            assert torch.equal(full[k], v), (path, k)
