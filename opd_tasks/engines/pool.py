"""Data parallelism: N engine replicas (engines/process.py) behind one Generator/Scorer.

    pool = start_pool("vllm", "/ckpt/hf", opts, gpus=[0, 1, 2, 3], tp=1, name="rollout", run_dir=R)
    pool.generate(prompt_ids, n=8, sampling)     # == one replica's result, row for row
    pool.score(prompt_ids, response_ids)
    pool.close()

Rule: the rows of a call are cut into N contiguous blocks of near-equal size (block r starts at
r * len // N); replica r gets block r, and generation gets seed sampling.seed + start of the block, so
prompt i keeps seed sampling.seed + i as with one engine (the vllm and remote engines seed prompt i of
a call with seed + i). Requests go to every replica before any answer is read, so replicas work at
the same time; answers are put back in input order. Replicas start concurrently.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Sequence

from opd_tasks.engines.base import SamplingParams
from opd_tasks.engines.process import EngineProcess


def blocks(n: int, replicas: int) -> list[tuple[int, int]]:
    """[start, end) of each replica's rows: contiguous, sizes differing by at most one."""
    return [(r * n // replicas, (r + 1) * n // replicas) for r in range(replicas)]


class ReplicaPool:
    def __init__(self, replicas: list[EngineProcess], name: str):
        self.replicas, self.name = replicas, name

    def _fan(self, method: str, n_rows: int, args_of) -> list[Any]:
        spans = [(r, a, b) for r, (a, b) in enumerate(blocks(n_rows, len(self.replicas))) if b > a]
        for r, a, b in spans:
            self.replicas[r].submit(method, *args_of(a, b))
        out: list[Any] = []
        errors = []
        for r, _, _ in spans:  # read every answer (a replica's error must not leave others in flight)
            try:
                out.extend(self.replicas[r].result())
            except Exception as err:  # noqa: BLE001
                errors.append(err)
        if errors:
            raise errors[0]
        return out

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams):
        ids = [list(map(int, p)) for p in prompt_ids]
        return self._fan("generate", len(ids), lambda a, b: (ids[a:b], n, replace(sampling, seed=sampling.seed + a)))

    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]):
        p = [list(map(int, x)) for x in prompt_ids]
        r = [list(map(int, x)) for x in response_ids]
        return self._fan("score", len(p), lambda a, b: (p[a:b], r[a:b]))

    def score_topk(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], k: int):
        p = [list(map(int, x)) for x in prompt_ids]
        r = [list(map(int, x)) for x in response_ids]
        return self._fan("score_topk", len(p), lambda a, b: (p[a:b], r[a:b], int(k)))

    def load_weights(self, path: str) -> None:
        for rep in self.replicas:
            rep.submit("load_weights", path)
        for rep in self.replicas:
            rep.result()

    def can_sleep(self) -> bool:
        return all(rep.can_sleep() for rep in self.replicas)

    def sleep(self) -> None:
        for rep in self.replicas:
            rep.sleep()

    def wake_up(self) -> None:
        for rep in self.replicas:
            rep.wake_up()

    @property
    def pids(self) -> list[int]:
        return [rep.pid for rep in self.replicas]

    def close(self) -> None:
        for rep in self.replicas:
            rep.close()


def start_pool(kind: str, model_path: str, opts: dict, gpus: list[int], tp: int, dp: int, name: str,
               run_dir: str | None = None, log_dir: str | None = None, scorer: bool = False) -> ReplicaPool:
    """dp replicas of `kind` on gpus (replica r: gpus[r*tp:(r+1)*tp]; none on CPU), started at once."""
    names = [f"{name} replica {r}/{dp}" for r in range(dp)]

    def start(r: int) -> EngineProcess:
        return EngineProcess(kind, model_path, opts, gpus=gpus[r * tp:(r + 1) * tp], name=names[r],
                             run_dir=run_dir, log_dir=log_dir, scorer=scorer)

    with ThreadPoolExecutor(dp) as ex:
        futures = [ex.submit(start, r) for r in range(dp)]
    started, errors = [], []
    for f in futures:
        try:
            started.append(f.result())
        except Exception as err:  # noqa: BLE001
            errors.append(err)
    if errors:
        for rep in started:
            rep.close()
        raise errors[0]
    return ReplicaPool(started, name)


def build_engine(kind: str, model_path: str, opts: dict, placed, name: str, run_dir: str | None = None,
                 scorer: bool = False, sleep: bool = False):
    """The engine of one placed role: vllm as placed.dp replica processes on placed.gpus (each its own
    process, so ending it frees its memory and CUDA_VISIBLE_DEVICES pins it), hf / remote in process.
    sleep: build vllm with sleep mode where the platform has it (the registry then sleeps it)."""
    from opd_tasks.engines import make_generator, make_scorer
    if kind != "vllm":
        return (make_scorer if scorer else make_generator)(kind, model_path, **opts)
    opts = dict(opts, vllm={k: v for k, v in (opts.get("vllm") or {}).items() if k != "data_parallel_size"})
    if sleep:  # the replica turns it on only where vLLM has sleep mode (CUDA)
        opts["enable_sleep_mode"] = True
    dp, tp = (placed.dp, placed.tp) if placed is not None else (1, 1)
    return start_pool(kind, model_path, opts, placed.gpus if placed is not None else [], tp, dp, name, run_dir,
                      scorer=scorer)
