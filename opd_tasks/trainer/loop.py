"""One iteration of training: old_t (recomputed, or the rollout's behaviour_logp when that is the
same thing: choose_old_logp), then epochs x mini-batches of accumulated micro-batches.

Runs the same on a plain module (tests' reference) and on an FSDP2-sharded one; collectives are
used only when a process group of more than one rank exists.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from opd_tasks.logprobs import chunked_token_logp, gather_logp, gather_response, response_positions, token_logp
from opd_tasks.losses import LossParams, compute_loss, group_advantages
from opd_tasks.trainer import TrainError
from opd_tasks.trainer.batching import Rows, collate, group_ids, mini_batches, rank_plan
from opd_tasks.trainer.schedule import Schedule
from storage.faults import fault_point


@dataclass(frozen=True)
class LoopConfig:
    """What the loop needs of RunConfig (train.*, seed) for one iteration."""
    epochs: int = 1
    mini_batches: int = 1
    micro_batch_tokens: int = 8192
    grad_clip: float | None = 1.0
    seed: int = 0
    iteration: int = 0
    old_logp: str = "recompute"  # or "behaviour": old_t = behaviour_logp; "none" for sft (see choose_old_logp)
    logp_chunk_tokens: int = 1024  # response tokens per chunk of the output layer (0: full logits)
    schedule: Schedule | None = None  # lr per optimizer step (None: leave the optimizer's lr)
    no_sync: bool = False  # FSDP2: reduce gradients once per mini-batch, not per micro-batch


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def lean_head(model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Linear | None:
    """The output layer when the logits are exactly output_layer(final hidden state), else None.

    Checked once per model on a few tokens (the result is kept on the model), as the hf scorer
    does: the chunked path against the full logits, so a model with extra logit processing
    (Gemma-2 softcapping, logit scaling) takes the full path. Collective under FSDP2 (every rank
    makes its first response_logp call at the same point).
    """
    ok = getattr(model, "_opd_lean_head", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return None
    if ok is None:
        n = min(8, head.out_features)
        ids = torch.arange(n).unsqueeze(0)
        mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "start": torch.tensor([1]),
              "response_len": torch.tensor([n - 1])}
        device = device if device is not None else head.weight.device
        was = model.training
        model.eval()
        with torch.no_grad():
            full, mine = _logp(model, None, mb, device, 0), _logp(model, head, mb, device, 4)
        model.train(was)
        ok = full.shape == mine.shape and bool(torch.allclose(full, mine, rtol=1e-3, atol=1e-4))
        model._opd_lean_head = ok
    return head if ok else None


def response_logp(model: torch.nn.Module, mb: dict, device: torch.device, chunk_tokens: int = 1024,
                  topk: dict | None = None) -> torch.Tensor:
    """s_t of a collated micro-batch: [B, R] float32 (0 on padding), with grad when enabled.

    topk (loss.kind=topk): a dict that receives topk_logp.NAME [B, R, K], the student's log-probs at
    teacher NAME's stored ids (mb's teacher_topk_ids.NAME), from the same forward's full log-softmax
    (so this path takes the full logits, not the chunked one).

    chunk_tokens > 0 (and a plain linear output layer): the output layer runs on the response
    positions only, chunk_tokens at a time (chunked_token_logp: no [tokens, vocab] float32 tensor,
    forward or backward); it runs inside the model's forward (its forward is swapped for the call),
    so FSDP2 gathers and reduces its weight as usual. 0: full logits, then token_logp.
    """
    head = lean_head(model, device) if chunk_tokens > 0 and topk is None else None
    return _logp(model, head, mb, device, chunk_tokens, topk)


def _logp(model: torch.nn.Module, head: torch.nn.Linear | None, mb: dict, device: torch.device,
          chunk_tokens: int, topk: dict | None = None) -> torch.Tensor:
    ids = mb["input_ids"].to(device)
    att = mb["attention_mask"].to(device)
    start, rlen = mb["start"].to(device), mb["response_len"].to(device)
    if head is None:
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
        for key in [k for k in mb if k.startswith("teacher_topk_ids.")] if topk is not None else []:
            topk["topk_logp." + key.split(".", 1)[1]] = gather_logp(logits, start, mb[key].to(device))
        return gather_response(token_logp(logits, ids), start, rlen)[0]
    pred, mask = response_positions(start, rlen, ids.shape[1])
    targets = ids.reshape(-1)[pred + 1]

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # [B, L, H] -> [B, R] float32 log-probs
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred)
        logp = chunked_token_logp(h, head.weight, targets, head.bias, chunk=chunk_tokens)
        return logp.new_zeros(mask.shape).masked_scatter(mask, logp)

    head.forward = forward
    try:
        out = model(input_ids=ids, attention_mask=att, use_cache=False).logits
    finally:
        del head.forward
    if tuple(out.shape) != tuple(mask.shape):
        raise TrainError(f"{type(model).__name__}: its logits are not its output layer's result (shape "
                         f"{tuple(out.shape)}); set train.logp_chunk_tokens: 0 for this model")
    return out


@torch.no_grad()
def recompute_old_logp(model: torch.nn.Module, rows: Rows, token_budget: int, device: torch.device,
                       chunk_tokens: int = 1024) -> None:
    """old_t for every row with the current (rollout-time) weights; sets rows.token["old_logp"].

    Each rank scores its share of the rows; an all_reduce SUM of the zero-filled flat [T] tensor
    (T = all response tokens) gives every rank every row's old_t.
    """
    rank, world = _world()
    lens = rows.response_len
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    flat = torch.zeros(int(offsets[-1]), dtype=torch.float32)
    for idx in rank_plan(torch.arange(len(rows)), rows.lengths, token_budget, rank, world):
        mb = collate(rows, idx or [0], token_names=())
        values = response_logp(model, mb, device, chunk_tokens).cpu()
        for b, i in enumerate(idx or []):
            flat[offsets[i]:offsets[i + 1]] = values[b, : int(lens[i])]
    flat = _all_reduce(flat.to(device)).cpu()
    rows.token["old_logp"] = [flat[offsets[i]:offsets[i + 1]] for i in range(len(rows))]


OLD_LOGP_MODES = ("auto", "recompute", "behaviour")


def behaviour_mismatch(cfg, provenance: dict, init_hf: str, have_behaviour: bool, iteration: int) -> list[str]:
    """Why behaviour_logp is NOT log pi_old of the trainer's start weights (empty list: it is, up to
    float noise). cfg: the RunConfig; provenance: the scored stage's; init_hf: the trainer's init
    HF dir. It is when the student's own hf engine sampled these rows from exactly these weights
    (same checkpoint, same run config, this on-policy iteration) in float32 at temperature 1 with
    no top-k/top-p: then the sampling distribution is the model's softmax and b_t = log pi_old(y_t)."""
    r, why = cfg.rollout, []
    if iteration < 0 or provenance.get("iteration") != iteration:
        why.append(f"the rows are not this on-policy iteration's rollout (scored iteration "
                   f"{provenance.get('iteration')}, training iteration {iteration}; offline data is never)")
    if not have_behaviour:
        why.append("behaviour_logp is missing or null (offline data)")
    if r.engine != "hf":
        why.append(f"rollout.engine={r.engine} (other kernels than the trainer's; only hf is checked)")
    if r.temperature != 1.0 or r.top_p != 1.0 or 0 < r.top_k:
        why.append(f"rollout samples from a reshaped distribution (temperature={r.temperature}, "
                   f"top_p={r.top_p}, top_k={r.top_k})")
    if cfg.student.dtype != "float32" or cfg.train.mixed_precision != "none":
        why.append(f"student.dtype={cfg.student.dtype}, train.mixed_precision={cfg.train.mixed_precision} "
                   f"(both must be float32)")
    if provenance.get("config_hash") != cfg.config_hash():
        why.append("the scored stage was written under another run config")
    if _norm(provenance.get("student_checkpoint")) != _norm(init_hf):
        why.append(f"the rollout's student {provenance.get('student_checkpoint')!r} is not the trainer's "
                   f"start {init_hf!r}")
    return why


def _norm(path) -> str | None:
    return None if path is None else str(path).rstrip("/")


def choose_old_logp(mode: str, cfg, provenance: dict, init_hf: str, have_behaviour: bool,
                    iteration: int, loss_kind: str | None = None) -> tuple[str, str]:
    """(LoopConfig.old_logp, the reason) for mode auto / recompute / behaviour.

    auto: "behaviour" when behaviour_mismatch() finds nothing (saves one no-grad forward over every
    row), else "recompute". behaviour when it does not hold: TrainError naming the reasons.
    loss_kind "sft" (the loss being trained): "none", whatever the mode: sft has no ratio, no old_t.
    """
    if mode not in OLD_LOGP_MODES:
        raise TrainError(f"old_logp mode {mode!r} is not one of {OLD_LOGP_MODES}")
    if loss_kind == "sft":
        return "none", "the sft loss has no ratio, so no old_t is needed"
    if mode == "recompute":
        return "recompute", "asked for"
    why = behaviour_mismatch(cfg, provenance, init_hf, have_behaviour, iteration)
    if not why:
        return "behaviour", "rollout sampled these rows from the trainer's start weights (hf, float32, temperature 1)"
    if mode == "behaviour":
        raise TrainError(f"old_logp=behaviour, but behaviour_logp is not the start weights' log-prob: "
                         f"{'; '.join(why)}; use old_logp: recompute (or auto)")
    return "recompute", "; ".join(why)


def set_advantages(rows: Rows, params: LossParams) -> None:
    """kdrl: GRPO advantages over the WHOLE iteration (groups = prompt_id), before any split."""
    if params.kind == "kdrl":
        rows.advantages = group_advantages(rows.rewards, group_ids(rows.prompt_ids))


class _Metrics:
    """Combines per-micro-batch loss metrics across micro-batches and ranks (see losses.py):
    loss shares sum, *_max take the max, counts sum, the rest are token-weighted means
    (kdrl's reward_mean is a mean over sequences)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.sums: dict[str, float] = {}
        self.maxes: dict[str, float] = {}

    def _how(self, key: str) -> str:
        if key.startswith("loss") or key in ("tokens", "sequences"):
            return "sum"
        if key.endswith("_max"):
            return "max"
        return "seq" if (key == "reward_mean" and self.kind == "kdrl") else "tok"

    def add(self, m: dict[str, float]) -> None:
        for key, v in m.items():
            how = self._how(key)
            if how == "max":
                self.maxes[key] = max(self.maxes.get(key, -math.inf), v)
            else:
                w = 1.0 if how == "sum" else m["tokens" if how == "tok" else "sequences"]
                self.sums[key] = self.sums.get(key, 0.0) + w * v

    def reduce(self, keys: list[str], device: torch.device) -> dict[str, float]:
        """All ranks must call with the same `keys` (the loss's metric names)."""
        skeys = [k for k in keys if self._how(k) != "max"]
        mkeys = [k for k in keys if self._how(k) == "max"]
        s = _all_reduce(torch.tensor([self.sums.get(k, 0.0) for k in skeys], dtype=torch.float64, device=device))
        mx = _all_reduce(torch.tensor([self.maxes.get(k, -math.inf) for k in mkeys], dtype=torch.float64,
                                      device=device), dist.ReduceOp.MAX)
        tot = dict(zip(skeys, s.tolist()))
        out = {}
        for k in skeys:
            how = self._how(k)
            den = 1.0 if how == "sum" else tot["tokens" if how == "tok" else "sequences"]
            out[k] = tot[k] / den if den else 0.0
        out.update(zip(mkeys, mx.tolist()))
        return out


def _loss_keys(params: LossParams, rows: Rows) -> list[str]:
    """The loss's metric names, from a 1-row dry call (identical on every rank)."""
    mb = _loss_batch(collate(rows, [0]), torch.zeros(1, int(rows.response_len[0])), params)
    for n in rows.topk_ids:  # a uniform student over the K ids and the tail
        mb["topk_logp." + n] = torch.full(mb["teacher_topk_logp." + n].shape, -math.log(rows.top_k + 1))
    return list(compute_loss(params, mb)[1])


def _loss_batch(mb: dict, logp: torch.Tensor, params: LossParams) -> dict:
    batch = {k: v.to(logp.device) for k, v in mb.items() if isinstance(v, torch.Tensor)}
    batch["logp"] = logp
    if params.kind != "kdrl":  # rewards may be null outside kdrl; advantages are kdrl's only
        batch.pop("rewards", None)
        batch.pop("advantages", None)
    return batch


def _gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """FSDP2: reduce-scatter this micro-batch's gradients (sync) or keep accumulating them unsharded
    until a micro-batch that syncs (the last of the mini-batch). A plain module has nothing to sync."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def train_iteration(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rows: Rows, params: LossParams,
                    cfg: LoopConfig, device: torch.device, step: int = 0,
                    on_step: Callable[[dict], None] | None = None) -> dict:
    """Run cfg.epochs x cfg.mini_batches optimizer steps on `rows` (old_t recomputed first, or taken
    from behaviour_logp when cfg.old_logp == "behaviour").

    Each mini-batch's loss is the sum of its micro-batch losses, each divided by the GLOBAL number
    of valid tokens (token_mean) or sequences (seq_mean) of the mini-batch; gradients sum over
    ranks (per micro-batch, or once per mini-batch with cfg.no_sync). Step k's lr is
    cfg.schedule.lr_at(k - 1) and is recorded as "lr". Returns {"steps": [per-step metrics: loss, KL estimates, ratio stats, grad_norm, tokens,
    seconds], "step" (the global step after), "tokens_per_s" (prompt + response tokens of all ranks
    per second of the step loop), "tokens_per_s_after_first_step", "old_logp_seconds", ...}.
    """
    rank, world = _world()
    t0 = time.perf_counter()
    if params.kind == "sft":  # no ratio in SFT: old_t would be one wasted forward over every row
        pass
    elif cfg.old_logp == "behaviour":  # the caller checked that b_t = log pi_old (choose_old_logp)
        if "behaviour_logp" not in rows.token:
            raise TrainError("old_logp=behaviour, but the scored rows have no behaviour_logp; use recompute")
        rows.token["old_logp"] = [t.clone() for t in rows.token["behaviour_logp"]]
    else:
        model.eval()  # old_t is a property of the weights: no dropout noise in it
        recompute_old_logp(model, rows, cfg.micro_batch_tokens, device, cfg.logp_chunk_tokens)
    model.train()
    set_advantages(rows, params)
    t_old = time.perf_counter() - t0
    keys = _loss_keys(params, rows)
    steps = []
    t1 = time.perf_counter()
    for epoch in range(cfg.epochs):
        for k, mini in enumerate(mini_batches(len(rows), cfg.mini_batches, cfg.seed, cfg.iteration, epoch)):
            ts = time.perf_counter()
            norm = float(rows.response_len[mini].sum()) if params.aggregation == "token_mean" else float(len(mini))
            norm = max(norm, 1.0)  # a mini-batch of empty responses trains nothing (loss 0)
            acc = _Metrics(params.kind)
            counts = torch.zeros(2, dtype=torch.float64)  # input tokens, padded tokens (this rank)
            optimizer.zero_grad(set_to_none=True)
            plan = rank_plan(mini, rows.lengths, cfg.micro_batch_tokens, rank, world)  # same length on every rank
            for n, idx in enumerate(plan):
                _gradient_sync(model, not cfg.no_sync or n == len(plan) - 1)
                mb = collate(rows, idx or [int(mini[0])])
                student_topk = {} if params.kind == "topk" else None
                logp = response_logp(model, mb, device, cfg.logp_chunk_tokens, student_topk)
                if idx is None:  # dummy: same collectives as the other ranks, zero gradient
                    (logp.sum() * 0.0 + sum(t.sum() * 0.0 for t in (student_topk or {}).values())).backward()
                    continue
                loss, m = compute_loss(params, {**_loss_batch(mb, logp, params), **(student_topk or {})},
                                       normalizer=norm)
                loss.backward()
                acc.add(m)
                counts += torch.tensor([float(mb["attention_mask"].sum()), float(mb["input_ids"].numel())],
                                       dtype=torch.float64)
            max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            if cfg.schedule is not None:
                for g in optimizer.param_groups:
                    g["lr"] = cfg.schedule.lr_at(step)
            lr = float(optimizer.param_groups[0]["lr"])
            optimizer.step()
            step += 1
            counts = _all_reduce(counts.to(device)).cpu().tolist()
            rec = {"step": step, "epoch": epoch, "mini_batch": k, **acc.reduce(keys, device),
                   "lr": lr, "grad_norm": float(gn), "input_tokens": int(counts[0]), "padded_tokens": int(counts[1]),
                   "seconds": time.perf_counter() - ts}
            steps.append(rec)
            if on_step is not None and rank == 0:
                on_step(rec)
            fault_point("train.step")
    seconds = time.perf_counter() - t1
    tokens = sum(r["input_tokens"] for r in steps)
    later = steps[1:]  # the first step pays one-time costs (lazy init, allocator, gloo buffers)
    later_s = sum(r["seconds"] for r in later)
    return {"steps": steps, "step": step, "old_logp_seconds": t_old, "old_logp_source": cfg.old_logp,
            "seconds": seconds, "world_size": world,
            "rows": len(rows), "input_tokens": tokens, "padded_tokens": sum(r["padded_tokens"] for r in steps),
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "tokens_per_s_after_first_step": (sum(r["input_tokens"] for r in later) / later_s) if later_s else None}


def print_step(rec: dict) -> None:
    """The line a rank-0 worker prints per optimizer step (the launcher streams it)."""
    print("opd-train step " + json.dumps({k: (round(v, 6) if isinstance(v, float) else v)
                                          for k, v in rec.items()}), flush=True)
