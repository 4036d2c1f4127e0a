"""The toy world: a tokenizer, prompt datasets, a weak student and one teacher per domain, on a CPU.

    opd toy build --out DIR --size test        # or: build_world(DIR, size="test", seed=0)
    resolve("toy://teachers/add", cfg.toy_world)  # -> "/abs/DIR/teachers/add", built on first use
    cfg = resolve_config(cfg)                   # every toy:// path of a RunConfig made local

Layout of a world directory (world.json is written last: a world counts only when it exists):

    world.json  tokenizer/  student/  teachers/add/  teachers/rev/  data/{train,eval}.parquet

Every model directory holds HF safetensors weights + the tokenizer, so `from_pretrained(dir)` and
vLLM load it directly. Lineage (one Llama architecture for all, SFT on answers only):

    init    --SFT on add + rev until both are in student_band-->   student
    student --SFT on add only until teacher_target-->                teachers/add (teacher "adder")
    student --SFT on rev only until teacher_target-->                teachers/rev (teacher "reverser")

so the student is an earlier point of each teacher's own training path: OPD can take it there.
Size strong-to-weak changes the teachers' lineage (the student is built the same way):

    init (wider, deeper) --SFT on add + rev until both are in base_band-->   teachers/base
    teachers/base --SFT on one domain until teacher_target-->                teachers/add, teachers/rev

so each teacher's pre-RL base is teachers/base, not the student (world.json: teachers.NAME.base).
The student is weak but not lost: it writes well-formed answers and gets some right, because
sampled reverse KL learns nothing from a student whose samples are noise (measured: a student
at 3% collapsed to 0% under OPD at every learning rate tried).

Stopping is steered by dev accuracy (a private split, disjoint from train and eval, never trained
on), every `chunk` steps: these small models learn each task in a sudden jump whose timing moves
with the seed, so fixed step counts gave a student already at 98% on one seed and a teacher stuck
at 39% on another. Everything is a function of (size, seed, BUILDER_VERSION): the build runs in a
fresh Python process (`python -m opd_tasks.toy.world`) whose environment pins what else moves float
results between machines of one CPU kind: thread counts (spec.threads), the vector ISA of torch's,
MKL's and oneDNN's kernels (AVX2), Python's hash seed; inside it, torch's deterministic algorithms
and every seed are set before anything is drawn. tests/toy/test_world_pinned.py pins the test world's
weights (sha256) and accuracies.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from opd_tasks.errors import OpdError
from opd_tasks.toy.tasks import DOMAINS, SFTSampler, TaskSpec, make_splits, write_rows

BUILDER_VERSION = 4  # 4: built in a pinned, isolated process (v3 worlds differed between machines)
# The build process's environment, fixed before torch loads (threads: WorldSpec.threads). AVX2 is the
# widest ISA every machine of this kind has; wider kernels (AVX-512, AMX) round differently.
BUILD_ENV = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ISOLATED = True  # build in a fresh process (tests of the builder's mechanics set False: seconds, not minutes)
TEACHER_NAMES = {"add": "adder", "rev": "reverser"}  # configs/toy.yaml uses these names


class ToyWorldError(OpdError):
    """A toy:// path that cannot be resolved, or a toy world that cannot be built."""


@dataclass(frozen=True)
class WorldSpec:
    hidden_size: int
    num_heads: int          # head_dim = hidden_size / num_heads must be >= 32 for vLLM's CPU attention
    num_layers: int
    intermediate_size: int
    tasks: TaskSpec
    n_train: int            # prompts per domain in data/train.parquet
    n_eval: int             # prompts per domain in data/eval.parquet
    n_dev: int              # prompts per domain the builder steers by (never trained on, not shipped)
    student_band: tuple     # (lo, hi): the student stops once every domain's dev accuracy is in it ...
    student_max_steps: int  # ... or at this many steps, then keeps its closest checkpoint
    teacher_target: float   # a teacher stops once its domain has this dev accuracy ...
    teacher_max_steps: int  # ... or after this many steps
    chunk: int = 10         # steps between dev evaluations
    maintenance: float = 0.3  # student mix weight of a domain inside the band (below: 1, above: 0)
    batch_size: int = 64
    lr: float = 2e-3
    threads: int = 1        # 1: under load, 2 threads on 2 cores ran 2-6x slower per step
    # strong-to-weak: the teachers grow from a larger base (not from the student), trained on both
    # domains until each is inside base_band; None: the teachers are fine-tuned from the student
    base_hidden_size: int | None = None
    base_num_layers: int | None = None
    base_band: tuple | None = None


SIZES = {
    "demo": WorldSpec(hidden_size=128, num_heads=4, num_layers=2, intermediate_size=256,
                      tasks=TaskSpec(max_digits=3, min_letters=3, max_letters=5),
                      n_train=4096, n_eval=256, n_dev=64, student_band=(0.3, 0.6), student_max_steps=1500,
                      teacher_target=0.95, teacher_max_steps=1000),
    "test": WorldSpec(hidden_size=128, num_heads=4, num_layers=2, intermediate_size=256,
                      tasks=TaskSpec(max_digits=2, min_letters=3, max_letters=4),
                      n_train=256, n_eval=64, n_dev=32, student_band=(0.1, 0.4), student_max_steps=600,
                      teacher_target=0.75, teacher_max_steps=600, chunk=20, batch_size=32),
}
SIZES["strong-to-weak"] = WorldSpec(
    hidden_size=128, num_heads=4, num_layers=2, intermediate_size=256,
    tasks=TaskSpec(max_digits=3, min_letters=3, max_letters=5),
    n_train=4096, n_eval=256, n_dev=64, student_band=(0.3, 0.6), student_max_steps=1500,
    teacher_target=0.95, teacher_max_steps=1000,
    base_hidden_size=256, base_num_layers=3, base_band=(0.6, 0.85))
TOY_URIS = ("student", "tokenizer", "teachers/add", "teachers/rev", "teachers/adder",
            "teachers/reverser", "teachers/base", "data/train.parquet", "data/eval.parquet")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_world(out: str | Path) -> dict | None:
    """world.json of a complete world at `out`, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(out) / "world.json").read_text())
    except (OSError, ValueError):
        return None


def _matches(world: dict | None, size: str, seed: int) -> bool:
    """A complete world built by this builder with this size, seed and (unedited) spec."""
    spec = json.loads(json.dumps(asdict(SIZES[size])))
    return bool(world) and (world.get("builder_version"), world.get("size"), world.get("seed"),
                            world.get("spec")) == (BUILDER_VERSION, size, seed, spec)


@contextmanager
def _locked(out: Path):
    """One builder per world directory at a time (others wait here, then find the world built)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _paths(out: Path) -> dict:
    """The path entries of world.json for a world at `out` (absolute)."""
    return {
        "dir": str(out),
        "student": {"path": str(out / "student")},
        "teachers": {TEACHER_NAMES[d]: {"domain": d, "path": str(out / "teachers" / d),
                                        "base": str(out / ("teachers/base" if (out / "teachers" / "base").is_dir()
                                                           else "student"))} for d in DOMAINS},
        "tokenizer": {"path": str(out / "tokenizer")},
        "data": {n: {"path": str(out / "data" / f"{n}.parquet")} for n in ("train", "eval")},
    }


def _merge(into: dict, new: dict) -> dict:
    """Deep-merge `new` into `into` (in place) and return it."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def _relocate(world: dict, out: Path) -> dict:
    """A world moved or copied to another directory: rewrite its absolute paths (atomically)."""
    if world.get("dir") != str(out):
        _write_json_atomic(out / "world.json", _merge(world, _paths(out)))
    return world


def build_world(out: str | Path, size: str = "demo", seed: int = 0, force: bool = False) -> Path:
    """Build the toy world into `out` (or reuse the complete one there built with the same size, seed,
    spec and builder version). Returns the absolute world directory."""
    if size not in SIZES:
        raise ToyWorldError(f"toy world size {size!r} is unknown; use one of {sorted(SIZES)}")
    out = Path(out).expanduser().resolve()
    with _locked(out):
        world = read_world(out)
        if not force and _matches(world, size, seed):
            _relocate(world, out)
            return out
        _build(out, SIZES[size], size, seed)
    return out


def _save_model(model, tokenizer, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)


def _dev_accuracy(model, tok, dev: list[dict], max_new: int) -> dict[str, float]:
    from opd_tasks.engines.hf import HFGenerator
    from opd_tasks.evaluate import evaluate
    return evaluate(HFGenerator("toy-in-training", model=model, progress=False), tok, dev, max_new)


def _band_miss(acc: dict[str, float], band: tuple) -> float:
    """How far the accuracies are outside [lo, hi], summed over domains (0: all inside)."""
    lo, hi = band
    return sum(max(0.0, lo - a) + max(0.0, a - hi) for a in acc.values())


def _train_student(model, tok, sampler, dev, spec: WorldSpec, max_new: int) -> list[dict]:
    """Mixed SFT until every domain's dev accuracy is inside student_band at one check. Each chunk's
    mix follows the last check: a domain below the band gets weight 1, inside it `maintenance`,
    above it 0 (these models forget a domain within ~10 steps of not seeing it, so a pause pulls
    it back). At the step cap the checkpoint closest to the band is kept.
    Returns the dev curve: [{"step": s, DOMAIN: acc, ...}]."""
    from opd_tasks.toy.sft import SFT
    lo, hi = spec.student_band
    trainer, weights, curve = SFT(model, tok, spec.lr), {d: 1.0 for d in DOMAINS}, []
    best = (float("inf"), None, None)
    while trainer.steps < spec.student_max_steps:
        trainer.train(sampler.batch(spec.batch_size, weights) for _ in range(spec.chunk))
        acc = _dev_accuracy(model, tok, dev, max_new)
        curve.append({"step": trainer.steps, **acc})
        miss = _band_miss(acc, spec.student_band)
        if miss == 0:
            return curve
        if miss < best[0] and model is not None:
            best = (miss, copy.deepcopy(model.state_dict()), len(curve))
        weights = {d: 1.0 if acc[d] < lo else 0.0 if acc[d] > hi else spec.maintenance for d in DOMAINS}
    if best[1] is not None:
        model.load_state_dict(best[1])
        curve = curve[:best[2]]
    return curve


def _train_teacher(model, tok, sampler, dev, domain: str, spec: WorldSpec, max_new: int) -> list[dict]:
    """SFT on `domain` only until its dev accuracy reaches teacher_target. Returns the dev curve."""
    from opd_tasks.toy.sft import SFT
    trainer, curve, dev = SFT(model, tok, spec.lr), [], [r for r in dev if r["domain"] == domain]
    while trainer.steps < spec.teacher_max_steps:
        trainer.train(sampler.batch(spec.batch_size, {domain: 1.0}) for _ in range(spec.chunk))
        curve.append({"step": trainer.steps, **_dev_accuracy(model, tok, dev, max_new)})
        if curve[-1][domain] >= spec.teacher_target:
            break
    return curve


def _build(out: Path, spec: WorldSpec, size: str, seed: int) -> None:
    """Build in a fresh process with BUILD_ENV (or here, when ISOLATED is False)."""
    if not ISOLATED:
        return _build_here(out, spec, size, seed)
    threads = str(spec.threads)
    env = {**os.environ, **BUILD_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "opd_tasks.toy.world", str(out), size, str(seed), json.dumps(asdict(spec))]
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.strip().splitlines()[-15:])
        raise ToyWorldError(f"{out}: the toy world build failed (exit {res.returncode}):\n{tail}")


def _spec_from_json(text: str) -> WorldSpec:
    d = json.loads(text)
    d["tasks"] = TaskSpec(**d["tasks"])
    d["student_band"] = tuple(d["student_band"])
    return WorldSpec(**d)


def _deterministic_torch(seed: int) -> None:
    """Seeds and kernel choices of the build process (it exits afterwards: nothing to restore)."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _build_here(out: Path, spec: WorldSpec, size: str, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from opd_tasks.evaluate import greedy_accuracy
    from opd_tasks.toy.tokenizer import build_tokenizer

    t0 = time.time()
    (out / "world.json").unlink(missing_ok=True)  # the old world (if any) stops counting right away
    for stale in ("tokenizer", "student", "teachers", "data", "base"):  # base: builder v1
        shutil.rmtree(out / stale, ignore_errors=True)
    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(spec.threads)
    hf_logging.disable_progress_bar()  # "Writing model shards" x 4 says nothing here
    try:
        tok = build_tokenizer()
        tok.save_pretrained(out / "tokenizer")
        splits = make_splits(spec.tasks, spec.n_train, spec.n_eval, seed, n_dev=spec.n_dev)
        dev = splits.pop("dev")
        for name, rows in splits.items():
            write_rows(rows, out / "data" / f"{name}.parquet")
        held_out = {r["prompt"] for r in splits["eval"] + dev}  # SFT never sees an eval or dev prompt
        max_new = spec.tasks.max_digits + spec.tasks.max_letters + 2  # covers every answer + <eos>

        torch.manual_seed(seed)
        model_config = LlamaConfig(
            vocab_size=len(tok), hidden_size=spec.hidden_size, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers, max_position_embeddings=128, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(model_config)
        model.generation_config.pad_token_id = tok.pad_token_id
        sampler = SFTSampler(spec.tasks, held_out, seed)
        curves = {"student": _train_student(model, tok, sampler, dev, spec, max_new)}
        _save_model(model, tok, out / "student")
        base, base_config = model, None
        if spec.base_hidden_size:  # strong-to-weak: the teachers' own, larger base
            torch.manual_seed(seed + 1)
            base_config = LlamaConfig(**{**model_config.to_dict(), "hidden_size": spec.base_hidden_size,
                                         "intermediate_size": 2 * spec.base_hidden_size,
                                         "num_hidden_layers": spec.base_num_layers})
            base = LlamaForCausalLM(base_config)
            base.generation_config.pad_token_id = tok.pad_token_id
            curves["base"] = _train_student(base, tok, SFTSampler(spec.tasks, held_out, seed + 1), dev,
                                            replace(spec, student_band=spec.base_band), max_new)
            _save_model(base, tok, out / "teachers" / "base")
        for domain in DOMAINS:
            teacher = copy.deepcopy(base)
            curves[TEACHER_NAMES[domain]] = _train_teacher(teacher, tok, sampler, dev, domain, spec, max_new)
            _save_model(teacher, tok, out / "teachers" / domain)
        t_train = time.time() - t0

        # Accuracy on the eval split from the saved directories, as any user would load them.
        models = {"student": "student", **{TEACHER_NAMES[d]: f"teachers/{d}" for d in DOMAINS},
                  **({"teacher_base": "teachers/base"} if base_config is not None else {})}
        accuracy = {name: greedy_accuracy(str(out / rel), splits["eval"], max_new_tokens=max_new)
                    for name, rel in models.items()}
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
    world = _merge({
        "builder_version": BUILDER_VERSION, "size": size, "seed": seed,
        "tokenizer": {"vocab_size": len(tok)},
        "data": {name: {"rows": len(rows)} for name, rows in splits.items()},
        "accuracy": accuracy,
        "eval": {"split": "eval", "max_new_tokens": max_new, "decoding": "greedy"},
        "steps": {name: curve[-1]["step"] for name, curve in curves.items()},
        "dev_curves": curves,
        "examples": {d: next(r for r in splits["eval"] if r["domain"] == d) for d in DOMAINS},
        "spec": asdict(spec),
        "model_config": {k: v for k, v in model_config.to_dict().items()
                         if isinstance(v, (int, float, str, bool)) or v is None},
        **({"base_model_config": {k: v for k, v in base_config.to_dict().items()
                                  if isinstance(v, (int, float, str, bool)) or v is None}}
           if base_config is not None else {}),
        "sha256": {rel: _sha256(out / rel / "model.safetensors") for rel in models.values()}
        | {f"data/{n}.parquet": _sha256(out / "data" / f"{n}.parquet") for n in splits},
        "build_seconds": {"train": round(t_train, 1), "total": round(time.time() - t0, 1)},
    }, _paths(out))
    _write_json_atomic(out / "world.json", world)


def resolve(uri: str, toy_cfg) -> str:
    """`toy://student`, `toy://teachers/add` (or `/adder`), `toy://data/train.parquet`, ... -> the
    absolute local path, building the world named by `toy_cfg` (a ToyWorldConfig) on first use.
    Anything that is not a toy:// URI comes back unchanged."""
    if not uri.startswith("toy://"):
        return uri
    rel = uri.removeprefix("toy://").strip("/")
    rel = {f"teachers/{n}": f"teachers/{d}" for d, n in TEACHER_NAMES.items()}.get(rel, rel)
    if rel not in TOY_URIS:
        raise ToyWorldError(f"{uri}: not a part of the toy world; use toy://NAME with NAME one of {list(TOY_URIS)}")
    out = build_world(Path(toy_cfg.dir).expanduser(), size=toy_cfg.size, seed=toy_cfg.seed)
    return str(out / rel)


def _path_fields(cfg) -> list[tuple[str, object, str]]:
    """(dotted name, owner, attribute) of every path field of a RunConfig."""
    fields = [("student.path", cfg.student, "path"), ("data.train", cfg.data, "train"),
              ("data.eval", cfg.data, "eval")]
    fields += [(f"teachers[{i}].path", t, "path") for i, t in enumerate(cfg.teachers)]
    fields += [(f"teachers[{i}].reference.path", t.reference, "path") for i, t in enumerate(cfg.teachers)
               if t.reference is not None]
    if cfg.reference is not None:
        fields.append(("reference.path", cfg.reference, "path"))
    return fields


def resolve_config(cfg):
    """A copy of RunConfig `cfg` with every toy:// path (student, teachers, reference, data) resolved
    to a local path, the world being built on first use. `cfg` itself is not changed."""
    new = cfg.model_copy(deep=True)
    for name, owner, attr in _path_fields(new):
        value = getattr(owner, attr)
        if not (value or "").startswith("toy://"):
            continue
        if new.toy_world is None:
            raise ToyWorldError(
                f"{name} = {value!r} names the toy world, but the config has no `toy_world` section; "
                f"add e.g. `toy_world: {{dir: ~/.cache/opd/toy, size: demo, seed: 0}}` or give a local path")
        setattr(owner, attr, resolve(value, new.toy_world))
    return new


if __name__ == "__main__":  # the build process of _build: OUT SIZE SEED SPEC_JSON
    _out, _size, _seed, _spec = sys.argv[1:5]
    _deterministic_torch(int(_seed))
    _build_here(Path(_out), _spec_from_json(_spec), _size, int(_seed))
