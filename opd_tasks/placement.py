"""Where every engine and the trainer run, and whether each stage fits: `opd plan`, and the check
`opd run` makes before it starts.

    plan = make_plan(cfg, gpus=8, gpu_memory_gib=80)   # cfg: a resolved RunConfig
    plan.stages["scoring"]      # [Placed(role="teacher math", gpus=[0, 1], tp=2, dp=1, ...), ...]
    plan.errors                 # one line per problem, each naming the config field to change
    print(render_plan(plan))

Stages run one after another on the same GPUs (colocated, docs/architecture.md): rollout (the
student's engine, data_parallel_size replicas of tensor_parallel_size GPUs), scoring (every teacher
and the reference at once), train (FSDP ranks), eval (the student on the rollout engine's GPUs).
The engines of one stage must coexist; opd releases them before the next stage starts.

Memory, per GPU (GiB = 2**30), estimates a plan can make from the model's size:
- vllm engine: vLLM reserves gpu_memory_utilization x GPU memory up front; inside it go the weights
  (params x dtype bytes / tp), ENGINE_OVERHEAD_GIB (CUDA context, activations of one step) and the
  KV cache, which must hold at least one max_model_len sequence.
- hf engine: weights + KV of token_budget tokens + float32 logits of token_budget tokens + overhead.
- trainer (FSDP2, world size W, float32 master weights): (4 weights + 4 grads + 8 AdamW) x params / W,
  two gathered blocks in the compute dtype, activations of micro_batch_tokens ((6 hidden + 4
  intermediate) values per token per layer, or 2 x hidden per layer with activation checkpointing),
  logits of micro_batch_tokens (compute dtype + float32 log-softmax + float32 grad) + overhead.
Engines on the cpu (hf with device cpu) hold no GPU; a remote engine (a url) runs elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from opd_tasks.errors import OpdError
from opd_tasks.model_size import DTYPE_BYTES, Arch, ModelSizeError
from opd_tasks.model_size import model_arch as _model_arch

GIB = float(1 << 30)
ENGINE_OVERHEAD_GIB = 2.0
TRAIN_OVERHEAD_GIB = 2.0
DEFAULT_GPU_MEMORY_GIB = 80.0
VLLM_DEFAULT_UTILIZATION = 0.9  # vLLM's own default


class PlanError(OpdError):
    """A stage cannot fit or the placement is inconsistent; the message names the config fields."""


@dataclass
class Placed:
    """One engine (all its replicas) or the trainer, in one stage."""
    stage: str
    role: str               # "rollout", "teacher math", "reference", "trainer"
    field: str              # placement field of its devices, e.g. placement.teachers.math
    model_field: str        # e.g. teachers[0]
    engine: str             # vllm / hf / remote / fsdp
    gpus: list[int]         # replica r uses gpus[r * tp:(r + 1) * tp]
    tp: int = 1
    dp: int = 1
    reserved_gib: float = 0.0   # per GPU, held while the stage runs
    need_gib: float = 0.0       # per GPU, what it must hold at least
    detail: dict = field(default_factory=dict)
    source: str = ""            # where the model size came from
    url: str | None = None

    def replica_gpus(self, r: int) -> list[int]:
        return self.gpus[r * self.tp:(r + 1) * self.tp]


@dataclass
class Plan:
    gpus: int
    gpu_memory_gib: float
    stages: dict[str, list[Placed]]
    errors: list[str]

    def find(self, stage: str, role: str) -> Placed | None:
        """The placed role of a stage (None: the plan has no such role, e.g. a reference the loss
        does not read; its engine then runs unplaced: no GPU ids, one replica)."""
        return next((p for p in self.stages.get(stage, []) if p.role == role), None)

    def raise_if_unfit(self, source: str = "config") -> None:
        if self.errors:
            raise PlanError(f"{source}: does not fit {self.gpus} GPU(s) x {self.gpu_memory_gib:g} GiB:\n  "
                            + "\n  ".join(self.errors) + "\n(`opd plan` shows the whole plan; `opd run "
                            "--no-plan` skips this check)")

    def to_dict(self) -> dict:
        return {"gpus": self.gpus, "gpu_memory_gib": self.gpu_memory_gib, "fits": not self.errors,
                "errors": self.errors,
                "stages": {s: [{k: v for k, v in vars(p).items()} for p in ps] for s, ps in self.stages.items()}}


def _vllm_opts(section) -> tuple[int, int | None, float, int | None]:
    v = section.vllm or {}
    return (int(v.get("tensor_parallel_size", 1)), v.get("data_parallel_size"),
            float(v.get("gpu_memory_utilization", VLLM_DEFAULT_UTILIZATION)), v.get("max_model_len"))


def _hf_on_gpu(cfg, section) -> bool:
    dev = getattr(section, "device", None) or cfg.train.device
    return dev == "cuda"


def _want(value, default_count: int) -> tuple[list[int] | None, int]:
    """(explicit ids or None, how many GPUs) from a placement value (ids, a count, or None)."""
    if isinstance(value, list):
        return list(value), len(value)
    if isinstance(value, int):
        return None, value
    return None, default_count


def _engine(cfg, mem: float, stage: str, role: str, fld: str, model_field: str, model, arch: Arch, section, engine: str,
            url: str | None, place_value, max_tokens: int, errors: list[str]) -> tuple[Placed, list[int] | None]:
    dtype = model.dtype
    wbytes = arch.params * DTYPE_BYTES[dtype]
    p = Placed(stage=stage, role=role, field=fld, model_field=model_field, engine=engine, gpus=[],
               source=arch.source, url=url)
    if engine == "remote":
        p.detail = {"where": f"server at {url} (not on this node)"}
        return p, None
    if engine == "hf":
        kv = arch.kv_bytes_per_token(dtype) * section.token_budget
        logits = section.token_budget * (arch.vocab or 0) * 4
        p.detail = {"weights_gib": wbytes / GIB, "kv_cache_gib": kv / GIB, "logits_gib": logits / GIB}
        if not _hf_on_gpu(cfg, section):
            p.detail["where"] = "cpu (host memory)"
            return p, None
        p.need_gib = p.reserved_gib = (wbytes + kv + logits) / GIB + ENGINE_OVERHEAD_GIB
        ids, n = _want(place_value, 1)
        if n != 1:
            errors.append(f"{fld}: the hf engine uses one GPU, got {n}; give one GPU id or use engine vllm")
        return p, ids
    tp, dp_set, util, max_len = _vllm_opts(section)
    max_len = int(max_len or max_tokens)
    ids, n = _want(place_value, tp * (dp_set or 1))
    where = f"{fld} / {stage if stage != 'eval' else 'rollout'}.vllm"
    if n % tp:
        errors.append(f"{fld}: {n} GPUs is not a multiple of tensor_parallel_size={tp} ({where})")
    dp = max(1, n // tp)
    if dp_set is not None and dp * tp != n:
        errors.append(f"{fld}: {n} GPUs, but data_parallel_size={dp_set} x tensor_parallel_size={tp} = "
                      f"{dp_set * tp}; make them agree")
    kv_split = min(tp, arch.kv_heads or tp)
    kv_token = arch.kv_bytes_per_token(dtype) / kv_split
    weights = wbytes / tp / GIB
    p.tp, p.dp = tp, dp
    p.reserved_gib = util * mem
    p.need_gib = weights + ENGINE_OVERHEAD_GIB + kv_token * max_len / GIB
    free = p.reserved_gib - weights - ENGINE_OVERHEAD_GIB
    p.detail = {"weights_gib": weights, "gpu_memory_utilization": util, "max_model_len": max_len,
                "kv_cache_gib": max(free, 0.0),
                "kv_tokens": int(free * GIB / kv_token) if kv_token and free > 0 else None}
    if p.need_gib > p.reserved_gib:
        errors.append(f"{stage}: {role} ({model_field}: {arch.params / 1e9:.1f}B params, {dtype}) needs "
                      f"{p.need_gib:.1f} GiB per GPU at tensor_parallel_size={tp} (weights {weights:.1f}, KV for "
                      f"one {max_len}-token sequence {kv_token * max_len / GIB:.1f}, overhead "
                      f"{ENGINE_OVERHEAD_GIB:g}), but gpu_memory_utilization {util:g} x {mem:g} GiB = "
                      f"{p.reserved_gib:.1f} GiB; raise {where.split(' / ')[1]}.tensor_parallel_size "
                      f"(and {fld}), lower max_model_len, or use a smaller dtype/model")
    return p, ids


def _trainer(cfg, mem: float, arch: Arch, errors: list[str]) -> tuple[Placed, list[int] | None]:
    tc = cfg.train
    world = tc.nproc_per_node * tc.nnodes
    cbytes = 2 if tc.mixed_precision == "bf16" or cfg.student.dtype != "float32" else 4
    tokens = tc.micro_batch_tokens
    states = arch.params * 16 / world
    d = {"world_size": world, "nproc_per_node": tc.nproc_per_node, "weights_grads_adam_gib": states / GIB}
    need = states
    if arch.shaped:
        h, L, inter = arch.hidden, arch.layers, arch.intermediate
        block = (arch.params - 2 * (arch.vocab or 0) * h) / L
        gathered = 2 * block * cbytes
        full_layer = tokens * (6 * h + 4 * inter) * cbytes
        ckpt = bool(getattr(tc, "activation_checkpointing", False))
        acts = tokens * 2 * h * L * cbytes + full_layer if ckpt else full_layer * L
        chunk = min(tokens, getattr(tc, "logprob_chunk_tokens", None) or tokens)
        logits = chunk * arch.vocab * (cbytes + 8)
        d.update(gathered_blocks_gib=gathered / GIB, activations_gib=acts / GIB, logits_gib=logits / GIB,
                 micro_batch_tokens=tokens, activation_checkpointing=ckpt)
        need += gathered + acts + logits
    else:
        d["activations_gib"] = None  # declared params only: no shape to estimate from
    p = Placed(stage="train", role="trainer", field="placement.trainer", model_field="student", engine="fsdp",
               gpus=[], need_gib=need / GIB + TRAIN_OVERHEAD_GIB, detail=d, source=arch.source)
    p.reserved_gib = p.need_gib
    ids, n = _want(cfg.placement.trainer, tc.nproc_per_node)
    if n != tc.nproc_per_node:
        errors.append(f"placement.trainer: {n} GPUs, but train.nproc_per_node={tc.nproc_per_node}; make them agree")
    if p.need_gib > mem:
        errors.append(f"train: the trainer needs {p.need_gib:.1f} GiB per GPU at world size {world} "
                      f"(weights+grads+AdamW {states / GIB:.1f}, activations "
                      f"{(d.get('activations_gib') or 0):.1f}, logits {(d.get('logits_gib') or 0):.1f}), more than "
                      f"{mem:g} GiB; lower train.micro_batch_tokens or raise train.nproc_per_node/nnodes")
    return p, ids


def _assign(stage: str, wanted: list[tuple[Placed, list[int] | None, int]], gpus: int, errors: list[str]) -> None:
    """GPU ids for every GPU-holding member of a stage: explicit ids kept, the rest from 0 upwards."""
    taken: dict[int, Placed] = {}
    for p, ids, _ in wanted:
        for g in ids or []:
            if g >= gpus or g < 0:
                errors.append(f"{p.field}: GPU {g} does not exist on a node of {gpus} GPUs (opd plan --gpus / "
                              f"placement.gpus)")
            if g in taken and taken[g] is not p:
                errors.append(f"{p.field}: GPU {g} is also given to {taken[g].role} ({taken[g].field}), and both "
                              f"run at once in the {stage} stage; give them different GPUs")
            taken.setdefault(g, p)
        p.gpus = list(ids or [])
    free = (g for g in range(1 << 16) if g not in taken)
    for p, ids, n in wanted:
        if ids is None:
            p.gpus = [next(free) for _ in range(n)]
    used = sorted({g for p, _, _ in wanted for g in p.gpus})
    if used and used[-1] >= gpus and not any("does not exist" in e for e in errors):
        roles = ", ".join(f"{p.role} {len(p.gpus)}" for p, _, _ in wanted)
        errors.append(f"{stage}: needs {len({g for p, _, _ in wanted for g in p.gpus})} GPUs at once ({roles}) "
                      f"but the node has {gpus}; lower tensor/data_parallel_size or the placement counts "
                      f"({', '.join(p.field for p, _, _ in wanted)})")


def own_references(cfg) -> dict[str, tuple[str, object]]:
    """role -> (config field, model) of every distinct teacher's own reference (teachers[].reference,
    read under route) whose path is not the run reference's: each is one more scoring engine."""
    if cfg.combination != "route":
        return {}
    run_path = (cfg.reference or cfg.student).path
    out: dict[str, tuple[str, object]] = {}
    for i, t in enumerate(cfg.teachers):
        m = t.reference
        if m is not None and m.path != run_path and all(o.path != m.path for _, o in out.values()):
            out[f"reference of {t.name}"] = (f"teachers[{i}].reference", m)
    return out


def reference_role(cfg, path: str) -> str:
    """The plan's role of the reference model at `path`: "reference" (the run's) or "reference of NAME"."""
    return next((role for role, (_, m) in own_references(cfg).items() if m.path == path), "reference")


def run_reference_used(cfg) -> bool:
    """Whether the run's reference scores any row: yes unless every teacher (under route) names its own
    other one."""
    run_path = (cfg.reference or cfg.student).path
    return cfg.combination != "route" or any(t.reference is None or t.reference.path == run_path
                                             for t in cfg.teachers)


def make_plan(cfg, gpus: int | None = None, gpu_memory_gib: float | None = None, lenient: bool = False) -> Plan:
    """The plan of a resolved RunConfig (model paths readable, or sizes declared / known). lenient:
    a model of unknown size counts as 0 bytes (the devices are still assigned: runtime_plan)."""
    def model_arch(model, fld):  # noqa: F811 - the lenient wrapper of model_size.model_arch
        try:
            return _model_arch(model, fld)
        except ModelSizeError:
            if not lenient:
                raise
            return Arch(params=0.0, source="unknown")

    pl = cfg.placement
    gpus = gpus or pl.gpus or cfg.train.nproc_per_node
    mem = gpu_memory_gib or pl.gpu_memory_gib or DEFAULT_GPU_MEMORY_GIB
    errors: list[str] = []
    student = model_arch(cfg.student, "student")
    r = cfg.rollout
    max_tokens = r.max_new_tokens + 1024  # when max_model_len is not set: prompt room assumed
    stages: dict[str, list[Placed]] = {}
    for stage in ("rollout", "eval"):
        p, ids = _engine(cfg, mem, stage, "rollout" if stage == "rollout" else "student", "placement.rollout",
                         "student", cfg.student, student, r, r.engine, r.url, pl.rollout, max_tokens,
                         errors if stage == "rollout" else [])
        stages[stage] = [(p, ids)]
    s = cfg.scoring
    scoring = []
    for i, t in enumerate(cfg.teachers):
        engine = "remote" if (t.url and s.engine != "hf") else s.engine
        arch = model_arch(t, f"teachers[{i}]")
        scoring.append(_engine(cfg, mem, "scoring", f"teacher {t.name}", f"placement.teachers.{t.name}",
                               f"teachers[{i}]", t, arch, s, engine, t.url, pl.teachers.get(t.name),
                               max_tokens, errors))
    if cfg.needs_reference:
        ref = cfg.reference or cfg.student
        fld = "reference" if cfg.reference else "student"
        own = own_references(cfg)
        engine = "remote" if s.engine == "remote" else s.engine
        if run_reference_used(cfg):
            scoring.append(_engine(cfg, mem, "scoring", "reference", "placement.reference", fld, ref,
                                   model_arch(ref, fld), s, engine, None, pl.reference, max_tokens, errors))
        for role, (mfield, m) in own.items():  # each distinct teacher's own reference: one more engine
            scoring.append(_engine(cfg, mem, "scoring", role, f"{mfield} (its GPUs: the first free ones)", mfield,
                                   m, model_arch(m, mfield), s, engine, None, None, max_tokens, errors))
    stages["scoring"] = scoring
    stages["train"] = [_trainer(cfg, mem, student, errors)]
    out: dict[str, list[Placed]] = {}
    for stage in ("rollout", "scoring", "train", "eval"):
        members = stages[stage]
        wanted = [(p, ids, _count(p, ids)) for p, ids in members]
        gpu_members = [w for w in wanted if w[0].engine in ("vllm", "fsdp") or w[0].reserved_gib]
        _assign(stage, gpu_members, gpus, errors if stage != "eval" else [])
        per_gpu: dict[int, float] = {}
        for p, _, _ in gpu_members:
            for g in p.gpus:
                per_gpu[g] = per_gpu.get(g, 0.0) + p.reserved_gib
        for g, total in sorted(per_gpu.items()):
            who = [p.role for p, _, _ in gpu_members if g in p.gpus]
            if total > mem + 1e-9 and stage != "eval" and len(who) > 1:  # one alone: reported above
                errors.append(f"{stage}: GPU {g} would hold {total:.1f} GiB ({', '.join(who)}), more than {mem:g} "
                              f"GiB; give them different GPUs (placement) or lower gpu_memory_utilization")
        out[stage] = [p for p, _ in members]
    return Plan(gpus=gpus, gpu_memory_gib=mem, stages=out, errors=list(dict.fromkeys(errors)))


def _count(p: Placed, ids) -> int:
    if ids is not None:
        return len(ids)
    if p.engine == "vllm":
        return p.tp * p.dp
    if p.engine == "fsdp":
        return p.detail["nproc_per_node"]
    return 1 if p.reserved_gib else 0


def render_plan(plan: Plan) -> str:
    lines = [f"plan for {plan.gpus} GPU(s) x {plan.gpu_memory_gib:g} GiB (stages run one after another; each "
             f"stage's engines are released before the next)"]
    for stage, members in plan.stages.items():
        lines.append(f"{stage}:")
        for p in members:
            if not p.gpus:
                where = p.detail.get("where", "no GPU")
                lines.append(f"  {p.role:<18} {p.engine:<6} {where}")
                continue
            rep = (f"{p.dp} x tp{p.tp} on GPUs {p.gpus}" if p.engine == "vllm" else f"GPUs {p.gpus}")
            d = p.detail
            parts = [f"{k.removesuffix('_gib')} {v:.1f} GiB" for k, v in d.items()
                     if k.endswith("_gib") and isinstance(v, float)]
            if d.get("kv_tokens"):
                parts.append(f"KV {d['kv_tokens']} tokens")
            held = (f"of the {p.reserved_gib:.1f} GiB it reserves" if p.engine == "vllm"
                    else f"of {plan.gpu_memory_gib:g} GiB")
            lines.append(f"  {p.role:<18} {p.engine:<6} {rep}: needs {p.need_gib:.1f} GiB per GPU {held} "
                         f"({', '.join(parts)}; size from {p.source})")
    lines.append("fits" if not plan.errors else "DOES NOT FIT:\n  " + "\n  ".join(plan.errors))
    return "\n".join(lines)


def check_plan(cfg, log=print) -> Plan | None:
    """`opd run`'s check before anything starts: PlanError when a stage cannot fit; a model whose size
    cannot be read here (not local, nothing declared) skips the check with a log line."""
    try:
        plan = make_plan(cfg)
    except ModelSizeError as err:
        log(f"placement check skipped: {err}")
        return None
    plan.raise_if_unfit(f"run {cfg.name}")
    return plan


_RUNTIME: dict[str, Plan] = {}


def runtime_plan(cfg) -> Plan:
    """The devices of every engine while a run executes (sizes unknown here count as 0; the fit was
    checked before the run started, unless --no-plan). Cached per config."""
    key = cfg.model_dump_json()
    if key not in _RUNTIME:
        _RUNTIME[key] = make_plan(cfg, lenient=True)
    return _RUNTIME[key]
