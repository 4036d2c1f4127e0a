"""Which loss, teacher combination and phase plan distills the toy student best (issues 7 and 10).

Every variant is configs/toy.yaml's world and teachers with the on-policy settings of BASE and a few
fields changed, run on the same toy world with the
same seeds and the same sample budget (iterations x prompts x G). Each run is an ordinary opd run
directory under --out, so a rerun skips what finished and `opd inspect` works on any of them.

    .venv/bin/python experiments/toy_experiments.py                       # every variant, seeds 0 1
    .venv/bin/python experiments/toy_experiments.py --only opd-route,grpo --seeds 0 --iterations 40

Prints one JSON object and writes OUT/results.json and OUT/results.md (mean and spread over seeds).
Not part of the test suite: it takes tens of minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOY = ROOT / "configs" / "toy.yaml"
ADDER = {"name": "adder", "path": "toy://teachers/add", "domain": "add", "weight": 0.5}
REVERSER = {"name": "reverser", "path": "toy://teachers/rev", "domain": "rev", "weight": 0.5}
# issue 22: the teachers grow from a larger base (toy://teachers/base), not from the student
S2W = {"dir": "~/.cache/opd/toy-s2w", "size": "strong-to-weak", "seed": 0}
OWN_BASE = {"reference": {"path": "toy://teachers/base"}}

# The experiments' base: configs/toy.yaml with the on-policy settings the tables were measured
# with (before the demo got its offline phase and top-k loss), so that every row stays reproducible
# whatever the demo's config becomes.
BASE = {"loss": {"kind": "rkl"}, "combination": "route", "offline": None,
        "rollout": {"engine": "hf", "prompts_per_iteration": 256, "group_size": 4, "temperature": 1.0,
                    "max_new_tokens": 16},
        "scoring": {"engine": "hf", "token_budget": 32768},
        "train": {"lr": 5.0e-4, "epochs": 4, "mini_batches": 1, "micro_batch_tokens": 8192, "nproc_per_node": 1},
        "eval": {"every": 10, "max_new_tokens": 16}}

# name -> (what it tests, overrides merged into BASE)
VARIANTS: dict[str, tuple[str, dict]] = {
    "opd-route": ("OPD (rkl, lambda 1), each prompt scored by its domain's teacher",
                  {"loss": {"kind": "rkl"}, "combination": "route"}),
    "opd-mixture": ("OPD, log of the 50/50 mixture of both teachers' probabilities",
                    {"loss": {"kind": "rkl"}, "combination": "mixture"}),
    "exopd1.25-route": ("ExOPD (gopd, lambda 1.25, reference = initial student), routed",
                        {"loss": {"kind": "gopd", "lambda": 1.25}, "combination": "route"}),
    "exopd1.25-mixture": ("ExOPD lambda 1.25, mixture",
                          {"loss": {"kind": "gopd", "lambda": 1.25}, "combination": "mixture"}),
    "exopd1.5-route": ("ExOPD lambda 1.5, routed",
                       {"loss": {"kind": "gopd", "lambda": 1.5}, "combination": "route"}),
    "exopd1.5-mixture": ("ExOPD lambda 1.5, mixture",
                         {"loss": {"kind": "gopd", "lambda": 1.5}, "combination": "mixture"}),
    "kdrl-route": ("KDRL: GRPO on the verifier reward + k2 KD (w_kd 0.1), routed",
                   {"loss": {"kind": "kdrl", "w_rl": 1.0, "w_kd": 0.1, "kd_estimator": "k2"}, "combination": "route"}),
    "grpo": ("GRPO alone (kdrl with w_kd 0): reward only, no teacher signal",
             {"loss": {"kind": "kdrl", "w_rl": 1.0, "w_kd": 0.0}, "combination": "route"}),
    "kd-only": ("pure KD (kdrl with w_rl 0, w_kd 1, k2), routed",
                {"loss": {"kind": "kdrl", "w_rl": 0.0, "w_kd": 1.0, "kd_estimator": "k2"}, "combination": "route"}),
    "adder-only": ("OPD from the adder alone (on every prompt)",
                   {"teachers": [dict(ADDER, weight=1.0)], "combination": "mixture"}),
    "reverser-only": ("OPD from the reverser alone (on every prompt)",
                      {"teachers": [dict(REVERSER, weight=1.0)], "combination": "mixture"}),
    # Issue 22, strong-to-weak world: is reward correction (each teacher's own pre-RL base as the
    # G-OPD reference, log pi_teacher / pi_teacher_base) better than the student's base?
    "s2w-opd": ("strong-to-weak world: OPD (rkl), routed",
                {"toy_world": S2W, "loss": {"kind": "rkl"}, "combination": "route"}),
    "s2w-exopd1.25": ("strong-to-weak world: ExOPD lambda 1.25, reference = the student's initial weights",
                      {"toy_world": S2W, "loss": {"kind": "gopd", "lambda": 1.25}, "combination": "route"}),
    "s2w-exopd1.25-corrected": ("strong-to-weak world: ExOPD lambda 1.25, reference = each teacher's own base "
                                "(reward correction, teachers[].reference)",
                                {"toy_world": S2W, "loss": {"kind": "gopd", "lambda": 1.25}, "combination": "route",
                                 "teachers": [dict(ADDER, **OWN_BASE), dict(REVERSER, **OWN_BASE)]}),
    # Issue 10: the same budget of sampled responses and optimizer steps, spent offline (SFT on
    # teacher samples, wrong answers dropped), on-policy (opd-route above), or half and half.
    "warm-start-only": ("SFT on routed teacher samples (wrong answers dropped), no on-policy iteration",
                        {"offline_share": 1.0}),
    "warm-start+opd": ("half the budget as the warm start, then OPD (routed) for the other half",
                       {"offline_share": 0.5}),
    # Issue 18: distillation on the routed teacher's stored top-8 (tail bucket), alone or + the rkl
    # sampled-token term (sampled_weight 1), same samples and steps as opd-route.
    **{f"topk-{d}{'+s' if w else ''}": (f"top-8 {d} (tail bucket), routed{' + rkl sampled-token term' if w else ''}",
                                       {"loss": {"kind": "topk", "divergence": d, "sampled_weight": w},
                                        "scoring": {"top_k": 8}, "combination": "route"})
       for d in ("fkl", "rkl", "jsd") for w in (0.0, 1.0)},
}


def merge(base: dict, over: dict) -> dict:
    """base with `over` merged in (nested dicts merged, everything else replaced)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def train_prompts(base: dict) -> int:
    """Rows of data/train.parquet of the config's toy world, from its world.json (built first if needed)."""
    from opd_tasks.config import ToyWorldConfig
    from opd_tasks.toy.world import build_world, read_world
    tw = ToyWorldConfig(**base.get("toy_world") or {})
    return int(read_world(build_world(tw.dir, tw.size, tw.seed))["data"]["train"]["rows"])


def variant_config(name: str, seed: int, iterations: int, epochs: int | None = None,
                   n_train: int | None = None, world_dir: str | None = None, prompts: int | None = None) -> dict:
    """The variant's run config; n_train: rows of the world's data.train (default: read from world.json)."""
    base = {k: v for k, v in dict(yaml.safe_load(TOY.read_text()), **BASE).items() if v is not None}
    if prompts:
        base["rollout"]["prompts_per_iteration"] = prompts
    if world_dir:  # a private toy world (the default ~/.cache one is shared by every run on the machine)
        base["toy_world"]["dir"] = world_dir
    if epochs:
        base["train"]["epochs"] = epochs
    over = dict(VARIANTS[name][1])
    if "loss" in over:  # a variant's loss replaces the base loss block (no leftover fields)
        base["loss"] = {}
    share = over.pop("offline_share", 0.0)
    cfg = merge(base, over)
    offline_steps = round(iterations * share)
    cfg.update(name=re.sub(r"[^A-Za-z0-9_-]", "_", f"exp-{name}-s{seed}"), seed=seed, iterations=iterations - offline_steps)
    if offline_steps:  # one step per iteration on-policy -> the same samples and steps offline
        r = cfg["rollout"]
        prompts, group = r["prompts_per_iteration"] * offline_steps, r["group_size"]
        n_train = n_train or train_prompts(base)
        while prompts > n_train:  # each prompt at most once: more samples per prompt instead
            prompts, group = prompts // 2, group * 2
        cfg["offline"] = {"source": "generate", "epochs": cfg["train"]["epochs"], "mini_batches": offline_steps,
                          "generate": {"model": "route", "prompts": prompts, "group_size": group},
                          "filter": {"min_reward": 1.0}}
    cfg["eval"] = dict(cfg["eval"], every=max(cfg["iterations"] // 4, 1))
    return cfg


def summarize(run_dir: Path) -> dict:
    """Final per-domain accuracy, its fraction of each domain's teacher, final KL per teacher."""
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    warm = run_dir / "offline" / "evaluation" / "metrics.json"
    if warm.exists():  # the warm start counts as an evaluated row before iteration 0
        w = json.loads(warm.read_text())
        rows.insert(0, {"iteration": -1, "accuracy": w.get("accuracy"), "kl": None})
    base = json.loads((run_dir / "baseline.json").read_text())
    domains = {t["name"]: t.get("domain") for t in yaml.safe_load((run_dir / "run.yaml").read_text())["teachers"]}
    teacher_acc = {d: base["teachers"][n][d] for n, d in domains.items() if d and n in base["teachers"]}
    final = next(r["accuracy"] for r in reversed(rows) if r.get("accuracy"))
    secs = [sum((r.get("seconds") or {}).values()) for r in rows if r["iteration"] >= 0 and r.get("seconds")]
    out = {"initial": base["student"], "final": final, "kl_final": rows[-1].get("kl"),
           "iterations": sum(r["iteration"] >= 0 for r in rows),
           "s_per_iteration": round(statistics.mean(secs), 1) if secs else None}
    out["teacher"] = teacher_acc
    out["fraction_of_teacher"] = {d: final[d] / teacher_acc[d] for d in final if teacher_acc.get(d)}  # taught domains
    return out


def _stat(values: list[float], fmt: str = ".3f") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def table(results: dict[str, list[dict]], domains=("add", "rev")) -> str:
    head = ["variant", *(f"acc {d}" for d in domains), *(f"% of teacher {d}" for d in domains),
            "KL adder (add)", "KL reverser (rev)", "s / iteration", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        cells = [name]
        cells += [_stat([r["final"][d] for r in runs]) for d in domains]
        cells += [_stat([100 * r["fraction_of_teacher"][d] for r in runs if d in r["fraction_of_teacher"]], ".0f")
                  for d in domains]
        cells += [_stat([r["kl_final"][t] for r in runs if (r["kl_final"] or {}).get(t) is not None])
                  for t in ("adder", "reverser")]
        cells.append(_stat([r["s_per_iteration"] for r in runs if r.get("s_per_iteration")], ".0f"))
        cells.append(str(len(runs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, results: dict[str, list[dict]], iterations: int, seeds: list[int]) -> dict:
    """OUT/results.md and OUT/results.json, rewritten after every run (a stopped sweep keeps its rows)."""
    about = "\n".join(f"- `{n}`: {VARIANTS[n][0]}" for n in results)
    (out / "results.md").write_text(f"{table(results)}\n\n{about}\n")
    doc = {"iterations": iterations, "seeds": seeds, "results": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    return doc


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/experiments")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--iterations", type=int, default=None, help="default: configs/toy.yaml's")
    ap.add_argument("--epochs", type=int, default=None, help="train.epochs (default: configs/toy.yaml's)")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--prompts", type=int, default=None, help="rollout.prompts_per_iteration (default: toy.yaml's)")
    ap.add_argument("--world-dir", default=None, help="toy_world.dir (default: configs/toy.yaml's)")
    ap.add_argument("--table", action="store_true", help="only rewrite OUT/results.md from OUT/results.json")
    args = ap.parse_args(argv)
    if args.table:  # re-summarized from the run directories where they exist (new fields appear)
        doc = json.loads((Path(args.out) / "results.json").read_text())
        for name, runs in doc["results"].items():
            for i, r in enumerate(runs):
                d = Path(args.out) / re.sub(r"[^A-Za-z0-9_-]", "_", f"exp-{name}-s{r['seed']}")
                if (d / "baseline.json").exists():
                    runs[i] = summarize(d) | {"seed": r["seed"], "wall_s": r.get("wall_s")}
        return write_results(Path(args.out), doc["results"], doc["iterations"], doc["seeds"])
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    iterations = args.iterations or yaml.safe_load(TOY.read_text())["iterations"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from flows.run import opd_run

    base = {k: v for k, v in dict(yaml.safe_load(TOY.read_text()), **BASE).items() if v is not None}
    if args.world_dir:
        base["toy_world"]["dir"] = args.world_dir
    n_train = train_prompts(base)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed-major: every variant has one seed before any has two
        for name in names:
            cfg = variant_config(name, seed, iterations, args.epochs, n_train, args.world_dir, args.prompts)
            run_dir = out / cfg["name"]
            cfg_path = out / f"{cfg['name']}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            t0 = time.perf_counter()
            try:
                opd_run(str(cfg_path), run_dir=str(run_dir))
            except Exception as err:  # noqa: BLE001 - one failed variant must not end the sweep
                print(json.dumps({"variant": name, "seed": seed, "error": repr(err)}), file=sys.stderr, flush=True)
                continue
            res = summarize(run_dir) | {"seed": seed, "wall_s": round(time.perf_counter() - t0, 1)}
            results.setdefault(name, []).append(res)
            print(json.dumps({"variant": name, **res}), file=sys.stderr, flush=True)
            doc = write_results(out, results, iterations, args.seeds)
    print(table(results), file=sys.stderr)
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
