"""The embedded engine: in-process transformers for rollout (HFGenerator) and scoring (HFScorer).

    scorer = HFScorer("models/teacher", token_budget=32768)
    logps = scorer.score(prompt_ids, response_ids)        # list of [len(response)] float32
    scored = scorer.score_topk(prompt_ids, response_ids, k=8)  # + the teacher's top-8 per position
    gen = HFGenerator("models/student")
    samples = gen.generate(prompt_ids, n=4, sampling=SamplingParams(temperature=1.0, seed=7))
    gen.load_weights("RUN/checkpoints/iter-000004/hf")    # in place, no rebuild

Works on token ids only. Every logits -> log-prob step of scoring goes through
opd_tasks.logprobs (token_logp + gather_response). Scoring sorts rows by length and packs
batches of at most token_budget padded tokens (rows x max_len); rows are right-padded and run
without an attention mask: with right padding a causal model's real positions never see the
padding, and the mask-free path is the fastest attention kernel. Only the positions that predict
response tokens go through the hidden -> vocab projection and the float32 log-softmax. Rows that
share a prompt (a prompt's G samples) are packed together and run that prompt once: a KV-cached,
left-padded prefill copied to the rows, then their responses with an attention mask
(HFScorer.shared_prefill; the values equal the per-row path's to float rounding).
Generation is a KV-cached sampling loop over left-padded batches; behaviour log-probs are read
off the very tensor that is sampled from (logits / temperature, then top-k/top-p if set).
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from opd_tasks.engines import EngineInputError
from opd_tasks.engines.base import Sample, SamplingParams, TopKScores
from opd_tasks.errors import ModelPathError
from opd_tasks.logprobs import DTYPES, gather_response, token_logp, topk_logp
from opd_tasks.models import load_causal_lm, load_safetensors, load_tokenizer, local_model_dir
from opd_tasks.packing import pack

# float32 logits of at most this many bytes at once (the [N, V] head output is chunked by rows)
LOGITS_BYTES = 32 << 20


def sampling_logp(logits: torch.Tensor, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Log-probs of the distribution that samples: logits [B, V] -> [B, V] float32.
    logits / temperature, then (only if set) keep the top_k largest and the smallest set of
    most likely tokens whose mass reaches top_p, renormalized (removed tokens get -inf)."""
    lg = logits.float() / temperature
    if 0 < top_k < lg.shape[-1]:
        kth = lg.topk(top_k, dim=-1).values[:, -1:]
        lg = lg.masked_fill(lg < kth, -math.inf)
    if top_p < 1.0:
        srt, idx = lg.sort(dim=-1, descending=True)
        p = srt.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p  # the mass before this token already reaches top_p
        drop[:, 0] = False
        lg = lg.masked_fill(drop.scatter(-1, idx, drop), -math.inf)
    return torch.log_softmax(lg, dim=-1)


class _HFEngine:
    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu", token_budget: int = 32768,
                 trust_remote_code: bool = False, progress: bool | None = None, model=None):
        if dtype not in DTYPES:
            raise EngineInputError(f"hf engine: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if token_budget <= 0:
            raise EngineInputError(f"hf engine: token_budget must be > 0, got {token_budget}")
        if model is not None:  # an in-memory model (e.g. one being trained): used as is, on its device
            device = model.device
        self.model_path, self.device, self.token_budget = str(model_path), torch.device(device), token_budget
        self.progress = sys.stderr.isatty() if progress is None else progress
        local = str(model_path) if model is not None else local_model_dir(model_path)  # a URL: the node's cached copy
        self.model = model if model is not None else load_causal_lm(local, dtype, device, trust_remote_code)
        cfg = self.model.config
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        gcfg = getattr(self.model, "generation_config", None)
        eos = _first_set(getattr(gcfg, "eos_token_id", None), getattr(cfg, "eos_token_id", None))
        if eos is None and any((Path(local) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            eos = load_tokenizer(local, trust_remote_code).eos_token_id
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or ()))
        pad = _first_set(getattr(gcfg, "pad_token_id", None), getattr(cfg, "pad_token_id", None),
                         self.eos_ids[0] if self.eos_ids else 0)
        pad = int(pad[0] if isinstance(pad, (list, tuple)) else pad)
        self.pad_id = pad if 0 <= pad < self.vocab_size else 0  # any in-vocab id: padding is never attended
        self.last_stats: dict = {}

    def load_weights(self, path: str) -> None:
        """Copy the weights of an HF export directory or URL (*.safetensors) into the model in place."""
        state = load_safetensors(path, device=str(self.device))
        with torch.no_grad():
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        loaded = {params[k].data_ptr() for k in state if k in params}
        missing = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]  # tied: fine
        if missing or unexpected:
            raise ModelPathError(f"{path}: weights do not fit the model of {self.model_path}: missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]}; export the same architecture")

    def _check_ids(self, seqs: Sequence[Sequence[int]], what: str, extra: int = 0) -> list[np.ndarray]:
        out = []
        for i, s in enumerate(seqs):
            a = np.asarray(s, dtype=np.int64).reshape(-1)
            if a.size and (a.min() < 0 or a.max() >= self.vocab_size):
                bad = int(a[(a < 0) | (a >= self.vocab_size)][0])
                raise EngineInputError(f"{what} {i}: token id {bad} is outside the vocabulary [0, {self.vocab_size}) "
                                       f"of {self.model_path}; ids must come from the student's tokenizer")
            if self.max_positions and a.size + extra > self.max_positions:
                raise EngineInputError(f"{what} {i}: {a.size} + {extra} tokens exceed max_position_embeddings="
                                       f"{self.max_positions} of {self.model_path}; shorten it")
            out.append(a)
        return out

    def _left_padded(self, prompts: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention mask, position ids), each [B, width] on the device: every row's last
        prompt token at width - 1, positions counting from 0 at each row's first real token."""
        width = max(p.size for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - p.size:] = torch.from_numpy(p)
            mask[b, width - p.size:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    @staticmethod
    def _first_of_each(keys: Sequence) -> tuple[list[int], dict]:
        """(the first row of each distinct key, key -> its index among them): the rows of one prompt
        share the prefill of its first row."""
        slot: dict = {}
        first: list[int] = []
        for b, key in enumerate(keys):
            if slot.setdefault(key, len(slot)) == len(first):
                first.append(b)
        return first, slot

    @contextmanager
    def _bar(self, desc: str, total: int) -> Iterator:
        """advance(n_tokens) callable; a rich progress bar with tokens/s when self.progress."""
        t0, done = time.perf_counter(), [0]
        if not self.progress:
            yield lambda n: done.__setitem__(0, done[0] + n)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            cols = [TextColumn(desc), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
            with Progress(*cols, transient=False) as bar:
                task = bar.add_task(desc, total=total, rate="")

                def advance(n: int) -> None:
                    done[0] += n
                    rate = done[0] / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, advance=n, rate=f"{rate:,.0f} tok/s")
                yield advance
        dt = time.perf_counter() - t0
        self.last_stats.update(tokens=done[0], seconds=dt, tokens_per_s=done[0] / max(dt, 1e-9))


class HFScorer(_HFEngine):
    """Scorer: per-token log-probs (temperature 1, float32) of responses given prompts."""

    # On CPU, forwards larger than this many padded tokens were slower per token (2 CPU cores,
    # 1-17M-param Llamas: 2048 ~ 1024 > 4096 > 8192 > 32768, the last ~2x slower), so on CPU a
    # packed batch holds at most min(token_budget, cpu_forward_tokens). Generation is not capped:
    # its decode steps gain from many rows.
    cpu_forward_tokens = 2048
    # rows with one prompt (its G samples) run that prompt once: a KV-cached prefill copied to the
    # rows, then their responses (_shared_states); the log-probs equal the one-forward-per-row
    # path's to float rounding (tests/engines/test_hf.py). Models whose logits are not the plain
    # head of the hidden states (softcapping, scaling) always take the one-forward path.
    shared_prefill = True

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu", token_budget: int = 32768,
                 trust_remote_code: bool = False, progress: bool | None = None):
        super().__init__(model_path, dtype, device, token_budget, trust_remote_code, progress)
        self._plain_head = _head_is_plain(self.model)

    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """result[i]: [len(response_ids[i])] float32, element j = log p(r_j | prompt_i + r_<j)."""
        return self._score(prompt_ids, response_ids, 0)

    def score_topk(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   k: int) -> list[TopKScores]:
        """score() plus, at every response position, the k most likely tokens and their log-probs,
        from the same float32 log-softmax of the same forward (engines.base.TopKScores)."""
        if not 0 < k <= self.vocab_size:
            raise EngineInputError(f"score_topk: k={k} must be in 1..{self.vocab_size} (the vocabulary of "
                                   f"{self.model_path}); fix scoring.top_k")
        return self._score(prompt_ids, response_ids, k)

    def _score(self, prompt_ids, response_ids, k: int) -> list:
        if len(prompt_ids) != len(response_ids):
            raise EngineInputError(f"score: {len(prompt_ids)} prompts but {len(response_ids)} responses; "
                                   f"pass one prompt per response")
        prompts = self._check_ids(prompt_ids, "prompt")
        responses = self._check_ids(response_ids, "response", 0)
        out = [np.zeros(0, np.float32) if not k else TopKScores.empty(k) for _ in prompts]
        todo = [i for i, r in enumerate(responses) if r.size]
        for i in todo:
            if prompts[i].size == 0:
                raise EngineInputError(f"score: sample {i} has an empty prompt; a response needs at least one "
                                       f"token before it (include BOS in prompt_ids)")
            if self.max_positions and prompts[i].size + responses[i].size > self.max_positions:
                raise EngineInputError(f"score: sample {i} has {prompts[i].size + responses[i].size} tokens, more "
                                       f"than max_position_embeddings={self.max_positions} of {self.model_path}")
        units = self._units(prompts, todo)
        lengths = [sum(prompts[i].size + responses[i].size for i in u) for u in units]
        cost = [self._unit_tokens(prompts, responses, u) for u in units]
        self.last_stats = {"batches": 0, "padded_tokens": 0, "forward_tokens": 0}
        budget = self.token_budget
        if self.device.type == "cpu":
            budget = min(budget, self.cpu_forward_tokens)
        with torch.inference_mode(), self._bar("score", sum(lengths)) as advance:
            for batch in pack(range(len(units)), cost, budget):
                rows = [i for b in batch for i in units[b]]
                keys = [b for b in batch for _ in units[b]]  # rows of one unit share its prompt
                values, forward = self._score_batch([prompts[i] for i in rows], [responses[i] for i in rows], k,
                                                    keys if len(rows) > len(batch) else None)
                for i, v in zip(rows, values):
                    out[i] = v
                self.last_stats["batches"] += 1
                self.last_stats["padded_tokens"] += len(batch) * cost[batch[0]]
                self.last_stats["forward_tokens"] += forward
                advance(sum(lengths[b] for b in batch))
        return out

    def _units(self, prompts: list[np.ndarray], todo: list[int]) -> list[list[int]]:
        """The rows to score, as packing units: with shared_prefill (and the plain head the shared
        path needs) the rows of one prompt (its G samples) are one unit, so they land in one batch
        and the prompt runs once; otherwise each row is its own unit."""
        if not (self.shared_prefill and self._plain_head):
            return [[i] for i in todo]
        groups: dict[bytes, list[int]] = {}
        for i in todo:
            groups.setdefault(prompts[i].tobytes(), []).append(i)
        return list(groups.values())

    @staticmethod
    def _unit_tokens(prompts: list[np.ndarray], responses: list[np.ndarray], unit: list[int]) -> int:
        """Padded tokens a unit runs: its prompt once, then every row's response (the longest)."""
        if len(unit) == 1:
            return prompts[unit[0]].size + responses[unit[0]].size
        return prompts[unit[0]].size + len(unit) * max(responses[i].size for i in unit)

    def _score_batch(self, prompts: list[np.ndarray], responses: list[np.ndarray], k: int = 0,
                     keys: list | None = None) -> tuple[list, int]:
        """(values per row, tokens run through the model). keys[b]: row b's unit; rows of one unit
        share its prompt, which then runs once (_shared_states)."""
        dev = self.device
        r_len = torch.tensor([r.size for r in responses], device=dev)
        if keys is not None:
            states, ids, p_len, forward = self._shared_states(prompts, responses, keys)
            head = self.model.get_output_embeddings()
        else:
            p_len = torch.tensor([p.size for p in prompts], device=dev)
            rows = [torch.from_numpy(np.concatenate([p, r])) for p, r in zip(prompts, responses)]
            ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_id).to(dev)  # [B, L]
            forward = ids.numel()
            if self._plain_head:
                states = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state  # [B, L, H]
                head = self.model.get_output_embeddings()
            else:  # a model with extra logit processing (softcapping, scaling): full forward
                states, head = self.model(input_ids=ids, use_cache=False).logits, None  # [B, L, V]
        # Row b's window: positions p_len[b]-1 .. p_len[b]+r_len[b]-1 (the last prompt token, then the
        # response). Windows of a group of rows are laid end to end as one sequence; token_logp on it
        # gives, at window offset j >= 1, log p(response token j-1); offset 0 is another row's junk.
        values: list[np.ndarray] = []
        for lo, hi in self._row_groups(r_len, head):
            count = r_len[lo:hi] + 1
            row = torch.repeat_interleave(torch.arange(lo, hi, device=dev), count)
            seg_start = torch.cumsum(count, 0) - count  # [G] window start in the flat sequence
            pos = p_len[row] - 1 + torch.arange(row.numel(), device=dev) - torch.repeat_interleave(seg_start, count)
            picked = states[row, pos]  # [M, H] or [M, V]
            logits = head(picked) if head is not None else picked
            flat = token_logp(logits[None], ids[row, pos][None])  # [1, M]
            v, _ = gather_response(flat.expand(hi - lo, -1), seg_start + 1, r_len[lo:hi])  # [G, R]
            v = v.cpu().numpy()
            rows_v = [np.ascontiguousarray(v[b, : responses[lo + b].size]) for b in range(hi - lo)]
            if k:  # window offset j predicts response token j: the same rows of the same logits
                top_ids, top_lp = (t.cpu().numpy() for t in topk_logp(logits, k))  # [M, k]
                starts = seg_start.tolist()
                rows_v = [TopKScores(lp, top_ids[a:a + lp.size].astype(np.int32), top_lp[a:a + lp.size])
                          for lp, a in zip(rows_v, starts)]
            values += rows_v
        return values, forward

    def _shared_states(self, prompts: list[np.ndarray], responses: list[np.ndarray],
                       keys: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Hidden states laid out as _score_batch's windows with every prompt cut to its last token:
        (states [B, 1 + R, H], ids [B, 1 + R], p_len = 1 per row, tokens run). Each distinct prompt
        runs once (left-padded, KV-cached), its cache is copied to its rows, and the responses run
        on it (right-padded, with the attention mask): position j + 1 of row b is the state after
        response token j, position 0 the state after the prompt's last token."""
        dev = self.device
        first, slot = self._first_of_each(keys)
        pids, pmask, ppos = self._left_padded([prompts[b] for b in first])
        out = self.model.base_model(input_ids=pids, attention_mask=pmask, position_ids=ppos, use_cache=True)
        expand = torch.tensor([slot[key] for key in keys], device=dev)
        cache = out.past_key_values
        cache.batch_select_indices(expand)
        rows = [torch.from_numpy(r) for r in responses]
        rids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.pad_id).to(dev)  # [B, R]
        r_len = torch.tensor([r.size for r in responses], device=dev)
        rmask = (torch.arange(rids.shape[1], device=dev)[None] < r_len[:, None]).long()
        rpos = torch.tensor([p.size for p in prompts], device=dev)[:, None] + torch.arange(rids.shape[1], device=dev)
        h = self.model.base_model(input_ids=rids, attention_mask=torch.cat([pmask[expand], rmask], 1),
                                  position_ids=rpos, past_key_values=cache, use_cache=True).last_hidden_state
        states = torch.cat([out.last_hidden_state[expand, -1:], h], 1)  # [B, 1 + R, H]
        ids = torch.cat([pids[expand, -1:], rids], 1)
        return states, ids, torch.ones(len(keys), dtype=torch.long, device=dev), pids.numel() + rids.numel()

    def _row_groups(self, r_len: torch.Tensor, head) -> list[tuple[int, int]]:
        """Consecutive row ranges whose float32 logits ([sum(r_len+1), V]) fit LOGITS_BYTES."""
        if head is None:
            return [(0, len(r_len))]
        per_row = ((r_len + 1) * self.vocab_size * 4).tolist()
        groups, lo, acc = [], 0, 0
        for b, nbytes in enumerate(per_row):
            if b > lo and acc + nbytes > LOGITS_BYTES:
                groups.append((lo, b))
                lo, acc = b, 0
            acc += nbytes
        groups.append((lo, len(per_row)))
        return groups


class HFGenerator(_HFEngine):
    """Generator: n sampled responses per prompt with behaviour log-probs, deterministic per seed."""

    compact_below = 0.75  # drop finished rows from the running batch once <= this fraction still runs
    shared_prefill = True  # one prefill per prompt, not per sample (tests/engines/test_hf.py: the same samples)

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu", token_budget: int = 16384,
                 trust_remote_code: bool = False, progress: bool | None = None, model=None):
        super().__init__(model_path, dtype, device, token_budget, trust_remote_code, progress, model)

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[list[Sample]]:
        """result[i][g]: sample g of prompt i. Stops at EOS (included in response_ids, with its
        log-prob; finish_reason "stop") or after sampling.max_new_tokens ("length").
        temperature 0 is greedy decoding (argmax of the logits; behaviour_logp then holds the
        chosen tokens' temperature-1 log-probs)."""
        if n < 1:
            raise EngineInputError(f"generate: n (samples per prompt) must be >= 1, got {n}")
        if not sampling.temperature >= 0 or not 0 < sampling.top_p <= 1 or sampling.max_new_tokens < 1:
            raise EngineInputError(f"generate: need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1; "
                                   f"got {sampling}")
        prompts = self._check_ids(prompt_ids, "prompt", sampling.max_new_tokens)
        empty = [i for i, p in enumerate(prompts) if p.size == 0]
        if empty:
            raise EngineInputError(f"generate: prompt {empty[0]} is empty; include at least BOS in prompt_ids")
        rows = [(i, g) for i in range(len(prompts)) for g in range(n)]
        lengths = [prompts[i].size + sampling.max_new_tokens for i, _ in rows]
        gen = torch.Generator(self.device).manual_seed(sampling.seed)
        out: list[list[Sample | None]] = [[None] * n for _ in prompts]
        self.last_stats = {"batches": 0, "sampling": sampling.to_dict()}
        with torch.inference_mode(), self._bar("generate", len(rows) * sampling.max_new_tokens) as advance:
            for batch in pack(range(len(lengths)), lengths, self.token_budget):
                samples = self._sample_batch([prompts[rows[b][0]] for b in batch], sampling, gen,
                                             [rows[b][0] for b in batch])
                for b, s in zip(batch, samples):
                    i, g = rows[b]
                    out[i][g] = s
                self.last_stats["batches"] += 1
                advance(sum(len(s.response_ids) for s in samples))
        return out  # type: ignore[return-value]

    def _sample_batch(self, prompts: list[np.ndarray], sp: SamplingParams, gen: torch.Generator,
                      keys: Sequence[int] | None = None) -> list[Sample]:
        """Sample one response per row. keys[b]: row b's prompt index; rows of one prompt (its G
        samples) share one prefill when shared_prefill: the prompt is run once and its KV cache and
        last logits are copied to its rows before the first sampling step."""
        dev, B, T = self.device, len(prompts), sp.max_new_tokens
        ids, mask, pos = self._left_padded(prompts)  # every row's last prompt token at the same column
        first, slot = self._first_of_each(keys if self.shared_prefill and keys is not None else range(B))
        if len(first) < B:
            out = self.model(input_ids=ids[first], attention_mask=mask[first], position_ids=pos[first],
                             use_cache=True, logits_to_keep=1)
            expand = torch.tensor([slot[k] for k in keys], device=dev)
            out.past_key_values.batch_select_indices(expand)
            out.logits = out.logits[expand]
        else:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=dev)
        tokens = torch.zeros((B, T), dtype=torch.long, device=dev)
        logp = torch.zeros((B, T), dtype=torch.float32, device=dev)
        length = torch.full((B,), T, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        next_pos = pos[:, -1:] + 1
        alive = torch.arange(B, device=dev)  # batch row of each row still in the model's batch
        for t in range(T):
            if sp.temperature == 0:  # greedy: the argmax of the raw logits (no ties made by rounding)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)  # [A, 1]
                lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            else:
                lp = sampling_logp(out.logits[:, -1], sp.temperature, sp.top_k, sp.top_p)  # [A, V]
                tok = torch.multinomial(lp.exp(), 1, generator=gen)  # [A, 1]
            tokens[alive, t], logp[alive, t] = tok[:, 0], lp.gather(1, tok)[:, 0]
            stop = alive[torch.isin(tok[:, 0], eos) & ~done[alive]]  # a row ends at its first EOS
            length[stop], done[stop] = t + 1, True
            if t == T - 1 or bool(done.all()):
                break
            keep = ~done[alive]
            if keep.sum() <= self.compact_below * len(alive):  # drop finished rows from the batch and cache
                idx = keep.nonzero()[:, 0]
                out.past_key_values.batch_select_indices(idx)
                alive, tok, mask, next_pos = alive[idx], tok[idx], mask[idx], next_pos[idx]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            out = self.model(input_ids=tok, attention_mask=mask, position_ids=next_pos,
                             past_key_values=out.past_key_values, use_cache=True)
            next_pos = next_pos + 1
        tokens, logp, length, done = tokens.cpu().numpy(), logp.cpu().numpy(), length.tolist(), done.tolist()
        return [Sample(response_ids=tokens[b, : length[b]].tolist(), behaviour_logp=logp[b, : length[b]].copy(),
                       finish_reason="stop" if done[b] else "length") for b in range(B)]


def _head_is_plain(model) -> bool:
    """True when logits == output_embeddings(base_model hidden states): checked on a few tokens,
    so a model with extra logit processing (softcapping, scaling) takes the full-forward path."""
    head = model.get_output_embeddings()
    if head is None or model.base_model is model:
        return False
    ids = torch.arange(min(8, model.get_input_embeddings().num_embeddings), device=model.device)[None]
    try:
        with torch.inference_mode():
            full = model(input_ids=ids, use_cache=False).logits.float()
            mine = head(model.base_model(input_ids=ids, use_cache=False).last_hidden_state).float()
    except (AttributeError, TypeError, ValueError):  # an unusual architecture: use the full forward
        return False
    return full.shape == mine.shape and torch.allclose(full, mine, rtol=1e-3, atol=1e-4)


def _first_set(*values):
    return next((v for v in values if v is not None), None)
