"""Training throughput: opd's trainer (world size 1 in process, 2 under torchrun) on precomputed
scored shards vs TRL's GKDTrainer (trl.experimental.gkd) with the same student, teacher, batch and
sequence lengths, on-policy (lmbda=1: the student generates, the teacher runs inside the step) and
off-policy (lmbda=0: dataset responses, the teacher still runs inside the step). Prints one JSON object.

    bash benchmarks/setup_bench_env.sh                        # once: .venv-bench with trl (never in .venv)
    .venv-bench/bin/python benchmarks/bench_training.py       # ~3-5 min on 2 busy cores, 1 thread
    .venv-bench/bin/python benchmarks/bench_training.py --teacher-same        # teacher = student's size
    .venv-bench/bin/python benchmarks/bench_training.py --hidden 512 --layers 6 --heads 8 --samples 64

Models: a 7.3M-parameter Llama student and, as teacher, bench_scoring.py's 27M Llama (a teacher
larger than its student, as in distillation); --teacher-same makes them the same size.
Tokens: prompt + response tokens of the rows trained on (attention-mask sum), the same count on
both sides. opd's time = old_t (a copy of behaviour_logp, or a recompute forward in
opd_w1_recompute) + its optimizer steps (model build and checkpoint save excluded; wall time
reported apart); TRL's = the sum of its steps (generation + teacher forward +
student forward/backward + optimizer; trainer construction excluded). Variants run interleaved,
--repeat times; *_tok_s are the best of the repeats, speedups the median of per-repeat ratios
(variants measured minutes apart on a shared machine differ more than side-by-side ones).
The headline speedups compare trainers (the issue's definition): opd reads teacher log-probs from
the scored shards, TRL computes them in its step. The *_pipeline speedups add opd's own rollout
(HFGenerator, on-policy only) and teacher scoring (HFScorer) of the same rows to opd's time: what
an on-policy (resp. off-policy) distillation step costs end to end.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, llama_config, log, long_tailed, machine, quiet_env, save_llama, versions  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %} {% endif %}")


def word_tokenizer(vocab: int):
    """WordLevel tokenizer: token id i >= 3 is the word "t{i}"; whitespace-split, so a text of n
    words is n tokens (TRL tokenizes chat text; opd works on the same ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   padding_side="left", chat_template=CHAT_TEMPLATE)


def text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def build(work: Path, args) -> dict:
    """Student + teacher dirs (weights + tokenizer) and the rows (prompt ids, response ids)."""
    student = llama_config(args.vocab, args.hidden, args.layers, args.heads)
    teacher = student if args.teacher_same else llama_config(args.vocab, args.teacher_hidden, args.teacher_layers,
                                                             args.teacher_heads)
    tok = word_tokenizer(args.vocab)
    paths = {}
    for name, cfg, seed in (("student", student, 0), ("teacher", teacher, 1)):
        paths[name] = str(save_llama(work / name, cfg, seed))
        tok.save_pretrained(paths[name])
    rng = np.random.default_rng(args.seed)
    G = args.group_size  # rows = samples / G prompts, each G times in a row (its G samples)
    p_len = long_tailed(rng, args.samples // G, args.prompt_median, 0.5, 4, 4 * int(args.prompt_median))
    prompts = [p for n in p_len for p in [rng.integers(3, args.vocab, n).tolist()] * G]
    # responses as long as on-policy generation makes them (max_new_tokens; a random student
    # almost never samples EOS), so both TRL variants and opd train on the same lengths
    responses = [rng.integers(3, args.vocab, args.response_len).tolist() for _ in prompts]
    return {**paths, "prompts": prompts, "responses": responses}


def write_scored_run(work: Path, data: dict, args, teacher_logp, behaviour_logp, own_rollout: bool = True) -> dict:
    """run.yaml + a scored stage (one part, manifest) written with storage.shards, as the scoring
    stage would; returns the trainer's path arguments. own_rollout: the provenance names the
    student as the rollout's checkpoint (as in a run, where the hf rollout sampled from it), so the
    trainer takes old_t from behaviour_logp (the student's own log-probs of these rows); False:
    data from elsewhere, old_t is recomputed."""
    import yaml

    from opd_tasks.config import parse_config
    from storage.fs import filesystem
    from storage.shards import build_provenance, commit_parts, rollout_table, scored_table, write_part

    n = len(data["prompts"])
    cfg = parse_config({
        "name": "bench", "student": {"path": data["student"]},
        "teachers": [{"name": "teacher", "path": data["teacher"]}], "loss": {"kind": "rkl"},
        "train": {"lr": 1e-5, "epochs": 1, "mini_batches": n // args.batch, "nproc_per_node": 1,
                  "micro_batch_tokens": args.micro_batch_tokens},
        "data": {"train": str(work / "unused.parquet")}})
    if not (work / "run.yaml").exists():
        (work / "run.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    rollout = rollout_table({
        "sample_id": [f"s{i}" for i in range(n)], "prompt_id": [f"p{i}" for i in range(n)], "group_index": 0,
        "prompt_ids": [np.asarray(p, np.int32) for p in data["prompts"]],
        "response_ids": [np.asarray(r, np.int32) for r in data["responses"]],
        "behaviour_logp": behaviour_logp, "finish_reason": "length", "iteration": 0})
    table = scored_table(rollout, {"teacher": teacher_logp}, combined=teacher_logp)
    fs, stage = filesystem(str(work / ("scored" if own_rollout else "scored-elsewhere")))
    prov = build_provenance("scored", iteration=0, config_hash=cfg.config_hash(),
                            teachers=[{"name": "teacher", "path": data["teacher"], "weight": 1.0}],
                            combination="mixture", student_checkpoint=data["student"] if own_rollout else None)
    info = write_part(fs, stage, 0, table, prov, vocab_size=args.vocab)
    commit_parts(fs, stage, "scored", {0: info}, cfg.config_hash())
    return {"config": str(work / "run.yaml"), "scored_dir": stage, "init_checkpoint": data["student"]}


def opd_run(work: Path, paths: dict, world: int, threads: int, k: int) -> dict:
    """One opd training iteration; world 1 in this process (launcher=auto), else torchrun."""
    tag = f"{world}-{Path(paths['scored_dir']).name}-{k}"
    out = {"out_checkpoint": str(work / f"ckpt-w{tag}"), "train_dir": str(work / f"train-w{tag}")}
    t0 = time.perf_counter()
    if world == 1:
        from opd_tasks.trainer.worker import TrainArgs, run
        m = run(TrainArgs(**paths, **out, iteration=0))
    else:
        from opd_tasks.trainer.launch import launch_training
        m = launch_training(**paths, **out, iteration=0, nproc_per_node=world,
                            env={"OMP_NUM_THREADS": str(threads)}, on_line=lambda line: None)
    wall = time.perf_counter() - t0
    for d in out.values():
        shutil.rmtree(d, ignore_errors=True)
    train_s = m["old_logp_seconds"] + m["seconds"]
    return {"seconds": train_s, "tokens": m["input_tokens"], "wall_s": wall, "steps": len(m["steps"]),
            "old_logp_s": m["old_logp_seconds"], "old_logp_source": m.get("old_logp_source"),
            "after_first_tok_s": m["tokens_per_s_after_first_step"]}


def trl_run(work: Path, data: dict, args, lmbda: float, k: int) -> dict:
    """One epoch of GKDTrainer over the same rows; times and token counts from inside its steps."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    stats = {"tokens": 0, "seconds": 0.0, "steps": 0, "threads": torch.get_num_threads()}

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            stats["tokens"] += int(inputs["attention_mask"].sum())  # after on-policy generation
            return super().compute_loss(model, inputs, *a, **kw)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            stats["seconds"] += time.perf_counter() - self.t0
            stats["steps"] += 1

    rows = [{"messages": [{"role": "user", "content": text(p)}, {"role": "assistant", "content": text(r)}]}
            for p, r in zip(data["prompts"], data["responses"])]
    conf = GKDConfig(output_dir=str(work / f"trl-{lmbda}-{k}"), per_device_train_batch_size=args.batch,
                     gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=1e-5, lmbda=lmbda, beta=1.0,
                     temperature=1.0, max_new_tokens=args.response_len, max_length=4096, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=10_000,
                     dataloader_num_workers=0, lr_scheduler_type="constant", max_grad_norm=1.0, seed=k,
                     disable_tqdm=True)
    student = AutoModelForCausalLM.from_pretrained(data["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(data["teacher"], dtype=torch.float32)
    trainer = Counting(model=student, teacher_model=teacher, args=conf, train_dataset=Dataset.from_list(rows),
                       processing_class=AutoTokenizer.from_pretrained(data["student"]), callbacks=[Clock()])
    trainer.train()
    shutil.rmtree(work / f"trl-{lmbda}-{k}", ignore_errors=True)
    return stats


ABLATION = (  # (name, fully_shard at world 1, fused AdamW, old_t); the first is the trainer before issue 8's fixes
    ("fsdp_adamw_recompute", True, False, "recompute"),
    ("fsdp_fused_recompute", True, True, "recompute"),
    ("plain_fused_recompute", False, True, "recompute"),
    ("plain_fused_behaviour", False, True, "behaviour"),
)


def trainer_ablation(paths: dict, repeat: int) -> dict:
    """opd's train_iteration (old_t + 4 steps) on the same rows with each ABLATION setting, in this
    process, interleaved `repeat` times: {name: [seconds per repeat]}."""
    import torch

    from opd_tasks.trainer.distributed import close_distributed, init_distributed, shard_model
    from opd_tasks.trainer.loop import LoopConfig, train_iteration
    from opd_tasks.trainer.worker import load_rows, loss_params, read_config

    cfg = read_config(paths["config"])
    out: dict[str, list] = {name: [] for name, *_ in ABLATION}
    d = init_distributed("cpu")
    try:
        for _ in range(repeat):
            for name, fsdp, fused, old in ABLATION:
                model = shard_model(_hf_model(paths["init_checkpoint"]), d.mesh, force=fsdp)
                t = cfg.train
                opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas),
                                        weight_decay=t.weight_decay, fused=fused)
                loop = LoopConfig(epochs=t.epochs, mini_batches=t.mini_batches, micro_batch_tokens=t.micro_batch_tokens,
                                  grad_clip=t.grad_clip, seed=cfg.seed, old_logp=old)
                rows = load_rows(paths["scored_dir"], cfg)
                t0 = time.perf_counter()
                train_iteration(model, opt, rows, loss_params(cfg, 0), loop, d.device)
                out[name].append(time.perf_counter() - t0)
                log(f"ablation {name}: {out[name][-1]:.2f} s")
    finally:
        close_distributed(d)
    return out


def _hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class OpdPrep:
    """opd's own rollout (HFGenerator: each of the samples / G prompts G times, response_len new
    tokens each) and teacher scoring (HFScorer) of the rows, timed; the engines are loaded once, as
    in a run. Levers, timed side by side in every repeat: the rollout and the teacher's scoring
    without the shared prefill (HFGenerator/HFScorer.shared_prefill = False: the prompt run once per
    sample, not once per prompt), and the teacher scored in
    bfloat16 (a teacher's `dtype: bfloat16` in a config) besides float32."""

    def __init__(self, data: dict, group_size: int, bf16: bool):
        from opd_tasks.engines.hf import HFGenerator, HFScorer

        self.data, self.G = data, group_size
        self.teacher = HFScorer(data["teacher"], progress=False)
        self.teacher_bf16 = HFScorer(data["teacher"], dtype="bfloat16", progress=False) if bf16 else None
        self.student = HFScorer(data["student"], progress=False)
        self.gen = HFGenerator(data["student"], progress=False)
        self.checks: dict = {}

    def run(self, response_len: int, k: int = 0) -> tuple[dict, list, list]:
        """({"rollout": s, "rollout_unshared": s, "score": s, "score_bf16": s}, teacher log-probs,
        the student's as behaviour_logp). The two rollouts swap order every repeat k."""
        from opd_tasks.engines.base import SamplingParams

        d, G = self.data, self.G
        sp = SamplingParams(max_new_tokens=response_len, seed=0)
        times, out = {}, {}
        for shared, key in ((True, "rollout"), (False, "rollout_unshared"))[::1 if k % 2 == 0 else -1]:
            self.gen.shared_prefill = shared
            t0 = time.perf_counter()
            out[key] = self.gen.generate(d["prompts"][::G], G, sp)
            times[key] = time.perf_counter() - t0
        self.gen.shared_prefill = True
        pairs = [(a, b) for x, y in zip(out["rollout"], out["rollout_unshared"]) for a, b in zip(x, y)]
        self.checks["shared_prefill_same_tokens"] = all(a.response_ids == b.response_ids for a, b in pairs)
        self.checks["shared_prefill_max_abs_logp_diff"] = max(
            float(np.abs(a.behaviour_logp - b.behaviour_logp).max()) for a, b in pairs)
        scored = {}
        for shared, key in ((True, "score"), (False, "score_unshared"))[::1 if k % 2 == 0 else -1]:
            self.teacher.shared_prefill = shared  # False: one forward per row, the prompt G times
            t0 = time.perf_counter()
            scored[key] = self.teacher.score(d["prompts"], d["responses"])
            times[key] = time.perf_counter() - t0
        self.teacher.shared_prefill = True
        teacher_logp = scored["score"]
        self.checks["shared_prefill_score_max_abs_logp_diff"] = max(
            float(np.abs(a - b).max()) for a, b in zip(scored["score"], scored["score_unshared"]) if a.size)
        if self.teacher_bf16 is not None:
            t0 = time.perf_counter()
            lp16 = self.teacher_bf16.score(d["prompts"], d["responses"])
            times["score_bf16"] = time.perf_counter() - t0
            diff = np.concatenate([a - b for a, b in zip(lp16, teacher_logp)])
            self.checks["bf16_teacher_logp_abs_diff"] = {"max": round(float(np.abs(diff).max()), 4),
                                                         "mean": round(float(np.abs(diff).mean()), 4)}
        return times, teacher_logp, self.student.score(d["prompts"], d["responses"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--teacher-hidden", type=int, default=512, help="default: bench_scoring.py's 27M model")
    ap.add_argument("--teacher-layers", type=int, default=6)
    ap.add_argument("--teacher-heads", type=int, default=8)
    ap.add_argument("--teacher-same", action="store_true", help="teacher = the student's architecture")
    ap.add_argument("--samples", type=int, default=32, help="rows per run (an epoch)")
    ap.add_argument("--batch", type=int, default=8, help="rows per optimizer step (both trainers)")
    ap.add_argument("--group-size", type=int, default=1,
                    help="samples per prompt (opd's rollout.group_size): the rows are samples/G prompts, each "
                         "G times; TRL trains on the same rows (it generates one sample per row)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 teacher-scoring lever")
    ap.add_argument("--prompt-median", type=float, default=24)
    ap.add_argument("--response-len", type=int, default=64, help="response tokens (= TRL max_new_tokens)")
    ap.add_argument("--micro-batch-tokens", type=int, default=8192, help="opd train.micro_batch_tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (per rank for opd)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablation", action="store_true",
                    help="only opd's trainer, in process: with/without fully_shard at world 1, fused AdamW, "
                         "old_t from behaviour_logp (what each of issue 8's trainer fixes buys)")
    ap.add_argument("--variants", default="opd_w1,opd_w1_recompute,opd_w2,trl_on,trl_off",
                    help="opd_wN_recompute: the scored rows do not name the student as their sampler, so "
                         "the trainer recomputes old_t instead of reading behaviour_logp")
    args = ap.parse_args()
    quiet_env()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    if args.samples % args.batch or args.samples % args.group_size:
        ap.error("--samples must be a multiple of --batch and of --group-size")
    variants = args.variants.split(",")

    # TRL's trainer and opd's in-process worker print progress to stdout: keep stdout for the JSON
    with tempfile.TemporaryDirectory(prefix="opd-bench-training-") as d, contextlib.redirect_stdout(sys.stderr):
        work = Path(d)
        data = build(work, args)
        times: dict[str, list] = {v: [] for v in variants}
        tokens: dict[str, list] = {v: [] for v in variants}
        steps: dict[str, int] = {}
        extra: dict[str, dict] = {}
        prep, paths = OpdPrep(data, args.group_size, not args.no_bf16), None
        if args.ablation:
            _, teacher_logp, behaviour = prep.run(args.response_len)
            secs = trainer_ablation(write_scored_run(work, data, args, teacher_logp, behaviour), args.repeat)
            base = secs[ABLATION[0][0]]
            with contextlib.redirect_stdout(sys.__stdout__):  # the JSON goes to the real stdout
                emit({"trainer_ablation_s": {k: [round(x, 3) for x in v] for k, v in secs.items()},
                      "speedup_vs_before": {k: round(statistics.median(b / x for b, x in zip(base, v)), 2)
                                            for k, v in secs.items()},
                      "samples": args.samples, "batch": args.batch, "threads": args.threads,
                      "machine": machine(), "versions": versions("torch", "transformers")})
            return
        for k in range(args.repeat):
            pre, teacher_logp, behaviour = prep.run(args.response_len, k)
            for key, sec in pre.items():
                times.setdefault("opd_" + key, []).append(sec)
            if paths is None:
                paths = {own: write_scored_run(work, data, args, teacher_logp, behaviour, own_rollout=own)
                         for own in (True, False)}
            for v in variants:
                if v.startswith("opd_w"):
                    r = opd_run(work, paths[not v.endswith("_recompute")], int(v[5]), args.threads, k)
                else:
                    r = trl_run(work, data, args, 1.0 if v == "trl_on" else 0.0, k)
                times[v].append(r["seconds"])
                tokens[v].append(r["tokens"])
                steps[v] = r["steps"]
                extra.setdefault(v, r)
                log(f"repeat {k}: {v} {r['seconds']:.2f} s, {r['tokens']} tokens, {r['steps']} steps")
        from transformers import AutoConfig, AutoModelForCausalLM
        params = {n: round(sum(p.numel() for p in AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(data[n])).parameters()) / 1e6, 2) for n in ("student", "teacher")}

    # per repeat: tokens/s of each variant; opd's pipelines add its rollout/scoring of that repeat
    rate = {v: [n / t for n, t in zip(tokens[v], times[v])] for v in variants}
    opd = "opd_w1" if "opd_w1" in variants else None
    if opd:  # lever variants: _unshared = the prompt run once per sample, _bf16 = the teacher scored in bfloat16
        for suffix, score, roll in (("", "opd_score", "opd_rollout"),
                                    ("_unshared", "opd_score_unshared", "opd_rollout_unshared"),
                                    ("_bf16", "opd_score_bf16", "opd_rollout")):
            if score not in times:
                continue
            rate["opd_onpolicy_pipeline" + suffix] = [n / (t + s + g) for n, t, s, g in
                                                      zip(tokens[opd], times[opd], times[score], times[roll])]
            rate["opd_offpolicy_pipeline" + suffix] = [n / (t + s) for n, t, s in
                                                       zip(tokens[opd], times[opd], times[score])]

        # the bound: opd's rollout + scoring alone (its trainer taking no time): no trainer work can
        # lift the end-to-end speedups above these
        rate["opd_onpolicy_pipeline_train_free"] = [n / (s + g) for n, s, g in
                                                    zip(tokens[opd], times["opd_score"], times["opd_rollout"])]
        rate["opd_offpolicy_pipeline_train_free"] = [n / s for n, s in zip(tokens[opd], times["opd_score"])]

    def ratio(a, b):
        """Median over repeats of the ratio of tokens/s measured in the same repeat (side by side)."""
        if a not in rate or b not in rate:
            return None
        return round(statistics.median(x / y for x, y in zip(rate[a], rate[b])), 2)

    emit({
        "params_m": params, "samples": args.samples, "batch": args.batch, "response_len": args.response_len,
        "tokens_per_run": {v: tokens[v][0] for v in variants}, "steps_per_run": steps, "threads": args.threads,
        **{f"{v}_tok_s": round(max(r)) for v, r in rate.items()},  # best of --repeat
        "speedup_vs_trl_gkd_onpolicy": ratio(opd, "trl_on"),
        "speedup_vs_trl_gkd_offpolicy": ratio(opd, "trl_off"),
        "speedup_vs_trl_gkd_onpolicy_pipeline": ratio("opd_onpolicy_pipeline", "trl_on"),
        "speedup_vs_trl_gkd_offpolicy_pipeline": ratio("opd_offpolicy_pipeline", "trl_off"),
        "speedup_bound_onpolicy_pipeline_train_free": ratio("opd_onpolicy_pipeline_train_free", "trl_on"),
        "speedup_bound_offpolicy_pipeline_train_free": ratio("opd_offpolicy_pipeline_train_free", "trl_off"),
        "speedup_vs_trl_gkd_onpolicy_pipeline_unshared": ratio("opd_onpolicy_pipeline_unshared", "trl_on"),
        "speedup_vs_trl_gkd_offpolicy_pipeline_unshared": ratio("opd_offpolicy_pipeline_unshared", "trl_off"),
        "speedup_vs_trl_gkd_onpolicy_pipeline_bf16": ratio("opd_onpolicy_pipeline_bf16", "trl_on"),
        "speedup_vs_trl_gkd_offpolicy_pipeline_bf16": ratio("opd_offpolicy_pipeline_bf16", "trl_off"),
        "shared_prefill_rollout_speedup": round(statistics.median(
            u / s for u, s in zip(times["opd_rollout_unshared"], times["opd_rollout"])), 2),
        "shared_prefill_score_speedup": round(statistics.median(
            u / s for u, s in zip(times["opd_score_unshared"], times["opd_score"])), 2),
        "bf16_score_speedup": round(statistics.median(
            a / b for a, b in zip(times["opd_score"], times["opd_score_bf16"])), 2) if "opd_score_bf16" in times else None,
        "lever_checks": prep.checks, "group_size": args.group_size,
        "speedup_vs_trl_gkd_offpolicy_recompute": ratio("opd_w1_recompute", "trl_off"),
        "opd_w2_vs_w1": ratio("opd_w2", "opd_w1"),
        "opd_w1_vs_recompute": ratio("opd_w1", "opd_w1_recompute"),
        "seconds": {v: [round(x, 3) for x in t] for v, t in times.items() if t},
        "opd_wall_s": {v: round(extra[v]["wall_s"], 2) for v in variants if v.startswith("opd")},
        "opd_old_logp_s": {v: round(extra[v]["old_logp_s"], 3) for v in variants if v.startswith("opd")},
        "opd_old_logp_source": {v: extra[v].get("old_logp_source") for v in variants if v.startswith("opd")},
        "trl_torch_threads": {v: extra[v]["threads"] for v in variants if v.startswith("trl")},
        "machine": machine(), "versions": versions("torch", "transformers", "trl"),
    })


if __name__ == "__main__":
    main()
