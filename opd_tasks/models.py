"""Every model, config and tokenizer load of opd: the rules for files we did not write live here.

    tok = load_tokenizer("s3://bucket/models/student", role="student")       # any fsspec URL or local dir
    model = load_causal_lm(path, dtype="bfloat16", role="teacher 'math'")    # inference: eval, no grads
    model = load_for_training(path, prepare=shard, device=dev, role="student")  # lean: each rank its shard
    state = load_safetensors(path)                                           # weights only (engines' reload)

- Paths may be local directories or fsspec URLs: a URL is copied once per node into the model cache
  (storage.model_cache: keyed by the export's manifest checksums, atomic, shared by the node's
  processes) and the copy is loaded. vLLM engines get the cached copy's path too.
- Weights are read from safetensors only (use_safetensors=True): pytorch_model.bin is a pickle, and
  unpickling runs code, so a directory with only .bin weights is refused with the fix.
- Code shipped with a model (an `auto_map` in config.json or tokenizer_config.json) runs only when
  the config's trust_remote_code field for that model is true, and is logged when it does.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable

from opd_tasks.errors import ModelPathError

log = logging.getLogger("opd.models")
_META_LOCK = threading.Lock()
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def local_model_dir(path: str | os.PathLike, role: str = "model", need_config: bool = True) -> str:
    """A local HF model directory for `path`: the directory itself, or for an fsspec URL its copy in
    the node's model cache. ModelPathError naming the role and the fix when it holds no model."""
    from storage.model_cache import is_url, materialize
    path = os.fspath(path)
    local = materialize(path, role) if is_url(path) else path
    if not os.path.isdir(local):
        raise ModelPathError(f"{role} path {path!r} does not exist; check the config's model paths "
                             f"(student.path, teachers[].path, reference.path)")
    if need_config and not os.path.isfile(os.path.join(local, "config.json")):
        raise ModelPathError(f"{role} path {path!r} has no config.json: not a Hugging Face model directory")
    return local


def _field(role: str) -> str:
    """The config field that turns on remote code for `role` (as used in error messages)."""
    if role.startswith("teacher"):
        return "teachers[].trust_remote_code" + (f" (teacher {role.split(' ', 1)[1]})" if " " in role else "")
    if role in ("student", "reference"):
        return f"{role}.trust_remote_code"
    return "trust_remote_code of this model in the run config"


def remote_code(local_dir: str, trust_remote_code: bool, role: str = "model", tokenizer: bool = False) -> bool:
    """The trust_remote_code to pass to transformers: refused (ModelPathError) when the model ships
    code (an auto_map: in config.json for a model, the AutoTokenizer entry or tokenizer_config.json
    for a tokenizer) and the config does not allow it; logged when it is allowed."""
    wants = []
    for name in ("config.json", "tokenizer_config.json") if tokenizer else ("config.json",):
        f = os.path.join(local_dir, name)
        try:
            auto = json.loads(Path(f).read_text()).get("auto_map") if os.path.isfile(f) else None
        except (OSError, ValueError, AttributeError):
            auto = None
        if auto and (not tokenizer or name != "config.json" or "AutoTokenizer" in auto):
            wants.append(name)
    if wants and not trust_remote_code:
        raise ModelPathError(f"{role} {local_dir!r}: {' and '.join(wants)} name code shipped with the model "
                             f"(auto_map); opd runs such code only when the config asks: set {_field(role)}: "
                             f"true if you trust its source")
    if trust_remote_code:
        log.warning("trust_remote_code=True for %s %s: code shipped with this model will run", role, local_dir)
    return trust_remote_code


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False, role: str = "tokenizer"):
    """AutoTokenizer of a directory (or URL) with tokenizer files (config.json optional: a tokenizer
    alone is fine); ModelPathError naming the role, the path and the fix otherwise."""
    from transformers import AutoTokenizer
    local = local_model_dir(path, role, need_config=False)
    try:
        trust = remote_code(local, trust_remote_code, role, tokenizer=True)
        return AutoTokenizer.from_pretrained(local, trust_remote_code=trust)
    except (OSError, ValueError, TypeError) as err:
        raise ModelPathError(f"{role} path {os.fspath(path)!r}: cannot load a tokenizer ({err}); the directory "
                             f"needs tokenizer files (tokenizer.json / tokenizer_config.json), e.g. from "
                             f"tokenizer.save_pretrained(DIR)") from None


def load_config(path: str | os.PathLike, trust_remote_code: bool = False, role: str = "model"):
    """The transformers config of a model directory (or URL)."""
    from transformers import AutoConfig
    local = local_model_dir(path, role)
    return AutoConfig.from_pretrained(local, trust_remote_code=remote_code(local, trust_remote_code, role))


@lru_cache(maxsize=32)
def max_context(path: str, trust_remote_code: bool = False) -> int:
    """The model's context length (max_position_embeddings), from its config only."""
    cfg = load_config(path, trust_remote_code)
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "max_seq_len", 1 << 20))


def _torch_dtype(dtype):
    import torch
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ModelPathError(f"dtype {dtype!r} is not one of {DTYPE_NAMES}")
    return getattr(torch, dtype)


def safetensors_files(local_dir: str, role: str = "model") -> list[str]:
    """The *.safetensors files of a local model directory; ModelPathError when there are none."""
    files = sorted(str(f) for f in Path(local_dir).glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for f in Path(local_dir).glob("*.bin")) + sorted(f.name for f in Path(local_dir).glob("*.pt"))
        why = (f" (it has {pickles[:3]}: pickles, which opd does not load because unpickling runs code; convert "
               f"with model.save_pretrained(DIR, safe_serialization=True))") if pickles else ""
        raise ModelPathError(f"{role} {local_dir!r}: no *.safetensors weights{why}")
    return files


def load_causal_lm(path: str | os.PathLike, dtype="float32", device: str = "cpu", trust_remote_code: bool = False,
                   role: str = "model"):
    """AutoModelForCausalLM of a directory (or URL) for inference: safetensors only, eval mode, no grads."""
    from transformers import AutoModelForCausalLM
    local = local_model_dir(path, role)
    safetensors_files(local, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(local, dtype=_torch_dtype(dtype), use_safetensors=True,
                                                     trust_remote_code=remote_code(local, trust_remote_code, role))
    except (OSError, ValueError) as err:
        raise ModelPathError(f"{role} path {os.fspath(path)!r}: cannot load the model ({err}); it needs "
                             f"config.json and *.safetensors weights") from None
    return model.to(device).eval().requires_grad_(False)


def load_safetensors(path: str | os.PathLike, device: str = "cpu", role: str = "model") -> dict:
    """{name: tensor} of every *.safetensors file of a directory (or URL): weights only, no pickle."""
    from safetensors.torch import load_file
    local = local_model_dir(path, role, need_config=False)
    state: dict = {}
    for f in safetensors_files(local, role):
        state.update(load_file(f, device=str(device)))
    return state


@contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory) while buffers
    (e.g. rotary inv_freq, computed in __init__ and not stored in checkpoints) stay real."""
    import torch
    with _META_LOCK:  # the patch is process-wide: one build at a time
        register = torch.nn.Module.register_parameter

        def on_meta(module, name, param):
            if param is not None and not param.is_meta:
                param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            register(module, name, param)

        torch.nn.Module.register_parameter = on_meta
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = register


def empty_causal_lm(config, dtype="float32", trust_remote_code: bool = False):
    """The causal LM of a transformers config with parameters on the meta device (no memory) and
    real buffers: to be filled (load_for_training) or given tensors (load_state_dict(assign=True))."""
    from transformers import AutoModelForCausalLM
    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code)


def load_for_training(path: str | os.PathLike, dtype="float32", prepare: Callable | None = None, device="cpu",
                      trust_remote_code: bool = False, role: str = "student"):
    """The causal LM of a directory (or URL) for training, loaded lean: built with empty (meta)
    parameters, `prepare(model)` applied while they are empty (FSDP2 sharding: each parameter
    becomes this rank's shard), then each rank reads only its own slice of every parameter from the
    memory-mapped safetensors files. No rank holds the full weights; the values are the ones
    from_pretrained(path, dtype=dtype) gives (tests/train/test_lean_load.py). Train mode."""
    local = local_model_dir(path, role)
    config = load_config(local, trust_remote_code, role)
    model = empty_causal_lm(config, dtype, trust_remote_code)
    if prepare is not None:
        model = prepare(model)
    fill_from_safetensors(model, local, device, role)
    return model.train()


def _local_slice(param):
    """(the tensor this rank holds for `param`, its index into the full tensor)."""
    from torch.distributed.tensor import DTensor
    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return param, tuple(slice(0, s) for s in param.shape)


class _SafetensorsFile:
    """One .safetensors file read with plain seeks (no mmap): a block of rows of a tensor goes
    straight into the destination's memory, so a rank touches only the bytes of its own shard."""
    DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "rb")
        n = int.from_bytes(self.file.read(8), "little")
        try:
            self.header = json.loads(self.file.read(n))
        except ValueError as err:
            raise ModelPathError(f"{path}: not a safetensors file ({err}); re-export the model") from None
        self.header.pop("__metadata__", None)
        self.base = 8 + n

    def keys(self):
        return self.header.keys()

    def read_into(self, key: str, dst, index: tuple) -> None:
        """dst[...] = tensor `key`[index], for an index that selects rows (dim 0) and keeps the rest."""
        import math

        import torch
        e = self.header[key]
        shape, (begin, end) = e["shape"], e["data_offsets"]
        dtype = getattr(torch, self.DTYPES[e["dtype"]])
        item = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * item or list(dst.shape) != [s.stop - s.start for s in index]:
            raise ModelPathError(f"{self.path}: tensor {key!r} has {end - begin} bytes for shape {shape}, "
                                 f"or does not fit the model's parameter {list(dst.shape)}; re-export the model")
        if any((s.start, s.stop) != (0, n) for s, n in zip(index[1:], shape[1:])):
            raise ModelPathError(f"{self.path}: {key!r}: only row blocks (dim 0) are read, got {index}")
        rows = index[0] if index else slice(0, 1)
        row = math.prod(shape[1:]) * item
        direct = dst.device.type == "cpu" and dst.dtype == dtype and dst.is_contiguous()
        buf = dst if direct else torch.empty(dst.shape, dtype=dtype)
        if buf.numel():
            self.file.seek(self.base + begin + rows.start * row)
            got = self.file.readinto(memoryview(buf.reshape(-1).view(torch.uint8).numpy()).cast("B"))
            if got != (rows.stop - rows.start) * row:
                raise ModelPathError(f"{self.path}: truncated at tensor {key!r}; re-export the model")
        if not direct:
            dst.copy_(buf)

    def close(self) -> None:
        self.file.close()


def fill_from_safetensors(model, local_dir: str, device="cpu", role: str = "model") -> None:
    """Materialize a model built by empty_causal_lm (sharded or not) on `device`: each parameter's
    local part (its rows, for an FSDP2 shard) is read from the safetensors files straight into its
    memory (tied parameters once); buffers kept, or read when the files hold them. ModelPathError
    when a parameter is not in the files."""
    import torch
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    aliases: dict[int, tuple] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), (p, []))[1].append(n)
    model.to_empty(device=device)
    for _, names in aliases.values():  # to_empty gives each module its own new tensor: tie them again
        first = model.get_parameter(names[0])
        for n in names[1:]:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)
    files = [_SafetensorsFile(f) for f in safetensors_files(local_dir, role)]
    try:
        where = {k: f for f in files for k in f.keys()}
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = [names[0] for _, names in aliases.values() if not any(n in where for n in names)]
        if missing:
            raise ModelPathError(f"{role} {local_dir!r}: the safetensors files lack {missing[:5]}; the weights are "
                                 f"not of this model's architecture (config.json)")
        with torch.no_grad():
            for _, names in aliases.values():
                key = next(n for n in names if n in where)
                local, index = _local_slice(params[names[0]])
                where[key].read_into(key, local, index)
            for n, b in model.named_buffers():
                if n in where:
                    where[n].read_into(n, b, tuple(slice(0, s) for s in b.shape))
                else:
                    b.copy_(buffers[n])
    finally:
        for f in files:
            f.close()
