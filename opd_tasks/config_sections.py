"""The sections of a run's config (opd_tasks.config.RunConfig): models, loss, rollout, scoring,
training, evaluation, data, the offline phase, placement and the toy world. Import them from
opd_tasks.config, which re-exports every one; this file only keeps config.py small."""
from __future__ import annotations

import math
import string
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from storage.errors import OpdError

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
Dtype = Literal["float32", "bfloat16", "float16"]
Engine = Literal["hf", "vllm", "remote"]

NODE_LAUNCHER_FIELDS = ("command", "node_rank", "nnodes", "rdzv_endpoint", "cwd")  # train.node_launcher's placeholders


class ConfigError(OpdError, ValueError):
    """A config that cannot run; the message names the file, the field and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelConfig(_Model):
    path: str = Field(description="HF model directory, fsspec URL, or toy://NAME")
    dtype: Dtype = "float32"
    trust_remote_code: bool = Field(False, description="run code shipped with the model; off unless set")
    params: float | None = Field(None, gt=0, description="parameter count for `opd plan` when config.json is not "
                                                         "readable at plan time (e.g. 8.2e9)")


class TeacherConfig(ModelConfig):
    name: Name = Field(description="column suffix in scored shards: teacher_logp.NAME")
    weight: float = Field(1.0, description="mixture/product weight (>= 0, normalized for mixture)")
    domain: str | None = Field(None, description="prompts of this domain go to this teacher (combination: route)")
    url: str | None = Field(None, description="OpenAI-compatible server for scoring.engine=remote")
    reference: ModelConfig | None = Field(
        None, description="G-OPD reward correction: this teacher's own pre-RL base as pi_ref for the samples "
                          "routed to it (combination: route, loss.kind: gopd); default: the run's reference")

    @model_validator(mode="after")
    def _weight(self) -> "TeacherConfig":
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"teacher {self.name!r}: weight must be finite and >= 0, got {self.weight}")
        return self


class LossConfig(_Model):
    kind: Literal["rkl", "gopd", "kdrl", "topk"] = Field(
        "rkl", description="rkl: on-policy reverse KL; gopd: G-OPD/ExOPD; kdrl: GRPO + KD; topk: divergence on "
                           "the teachers' stored top-k distributions (needs scoring.top_k)")
    lam: float = Field(1.0, alias="lambda", gt=0, description="G-OPD reward scale lambda; 1 = rkl, > 1 = ExOPD")
    discount: float = Field(0.0, ge=0, le=1, description="gamma for the discounted sum of future per-token rewards")
    clip_eps_low: float | None = Field(0.2, ge=0, le=1, description="PPO ratio clip below 1 (None: no clip)")
    clip_eps_high: float | None = Field(0.2, ge=0, description="PPO ratio clip above 1 (None: no clip)")
    tis_cap: float | None = Field(2.0, gt=0, description="truncated IS cap C on exp(old - behaviour) (None: off)")
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    w_rl: float = Field(1.0, ge=0, description="kdrl: weight of the GRPO term")
    w_kd: float = Field(0.005, ge=0, description="kdrl: weight of the KD term")
    w_kd_end: float | None = Field(None, ge=0, description="kdrl: anneal w_kd linearly to this over "
                                                           "w_kd_anneal_iterations iterations")
    w_kd_anneal_iterations: int | None = Field(
        None, gt=0, description="kdrl with w_kd_end: iterations over which w_kd moves to w_kd_end (reached at "
                                "iteration w_kd_anneal_iterations - 1, constant after); fixed, unlike `iterations`")
    kd_estimator: Literal["k2", "pg", "k3", "reward"] = Field("k2", description="kdrl: KD term estimator")
    kd_only_incorrect: bool = Field(False, description="kdrl: KD only on responses whose reward < 1")
    divergence: Literal["fkl", "rkl", "jsd"] = Field("fkl", description="topk: KL(teacher||student), "
                                                     "KL(student||teacher) or generalized JSD, on the top-k buckets")
    beta: float = Field(0.5, gt=0, lt=1, description="topk jsd: weight of the teacher in the mixture (-> 0: fkl, "
                                                     "-> 1: rkl)")
    tail: bool = Field(True, description="topk: a bucket for the mass outside the top-k (1 - sum) on both sides; "
                                         "false: both renormalized over the top-k")
    sampled_weight: float = Field(0.0, ge=0, description="topk: + this x the rkl sampled-token loss")

    @model_validator(mode="after")
    def _kdrl(self) -> "LossConfig":
        if self.kind == "kdrl" and self.w_rl == 0 and self.w_kd == 0:
            raise ValueError("loss: kdrl with w_rl = 0 and w_kd = 0 trains nothing; set one of them > 0")
        if self.w_kd_end is not None and self.w_kd_anneal_iterations is None:
            raise ValueError("loss.w_kd_end needs loss.w_kd_anneal_iterations (the iterations over which w_kd "
                             "anneals; `iterations` may change on resume, so it cannot be the span)")
        if self.kind == "kdrl" and self.w_rl == 0 and "w_kd" not in self.model_fields_set:
            # Pure KD must not keep the joint-loss default 0.005: that is a silent 200x lr cut.
            self.w_kd = 1.0
        return self


class RolloutConfig(_Model):
    engine: Engine = "hf"
    prompts_per_iteration: int = Field(32, gt=0)
    group_size: int = Field(4, gt=0, description="G: responses sampled per prompt")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1, description="keep 1.0: truncation biases the importance ratio")
    top_k: int = Field(-1, description="-1 disables; keep disabled for unbiased behaviour log-probs")
    max_new_tokens: int = Field(32, gt=0)
    token_budget: int = Field(16384, gt=0, description="hf: prompt+response tokens per generation batch")
    rows_per_part: int = Field(256, gt=0, description="samples per Parquet part")
    url: str | None = Field(None, description="OpenAI-compatible server for engine=remote")
    max_concurrency: int = Field(64, gt=0, description="remote: requests in flight")
    vllm: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM kwargs (tensor_parallel_size, ...)")


class ScoringConfig(_Model):
    engine: Engine = "hf"
    top_k: int = Field(0, ge=0, description="store each teacher's K most likely tokens and log-probs per response "
                                            "token (teacher_topk_ids/logp.NAME; 0: none); loss.kind=topk needs it")
    token_budget: int = Field(32768, gt=0, description="hf: padded tokens per forward batch")
    max_concurrency: int = Field(64, gt=0, description="remote: requests in flight")
    rows_per_request: int = Field(1, gt=0, description="remote: rows per request, sent as a list of prompts (the "
                                                       "same log-probs; less client CPU per row, e.g. 16)")
    vllm: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM kwargs")
    teachers: Literal["auto", "routed", "all"] = Field(
        "auto", description="routed: each teacher scores only the samples routed to it (its column is null for "
                            "the others; combination: route only); all: every teacher scores every sample "
                            "(analysis, recombination into a mixture); auto: routed under route, else all")
    streaming: Literal["auto", "on", "off"] = Field(
        "auto", description="score rollout part p while rollout makes part p+1 (the same shards as one after the "
                            "other); auto: when every teacher and the reference run apart from the rollout "
                            "engine (a remote server, or vllm on other GPUs: placement), not for in-process "
                            "engines on the same device")


class TrainConfig(_Model):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon: the update is lr * m / (sqrt(v) + eps)")
    epochs: int = Field(1, gt=0)
    mini_batches: int = Field(1, gt=0, description="optimizer steps per epoch")
    micro_batch_tokens: int = Field(8192, gt=0, description="padded tokens per forward/backward")
    grad_clip: float | None = Field(1.0, gt=0)
    nproc_per_node: int = Field(1, gt=0, description="torchrun ranks per node")
    nnodes: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["none", "bf16"] = "none"
    launcher: Literal["auto", "torchrun", "inprocess"] = Field(
        "auto", description="auto: in the flow's process when there is one rank (saves ~10 s of process "
                            "start per iteration), torchrun otherwise")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="lr over the run's optimizer steps (iterations x epochs x mini_batches when the "
                                "run starts, kept in the train state); linear/cosine decay to lr_end")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup to lr (any lr_schedule)")
    lr_end: float = Field(0.0, ge=0, description="linear/cosine: lr at the end of the decay (and after it)")
    no_sync_accumulation: bool = Field(
        False, description="FSDP2: reduce gradients once per mini-batch instead of per micro-batch (less "
                           "communication; each rank holds the full unsharded gradient meanwhile)")
    logp_chunk_tokens: int = Field(
        1024, ge=0, description="response tokens per chunk of the output layer: the [tokens, vocab] float32 "
                                "logits never exist whole (0: full logits)")
    activation_checkpointing: bool = Field(False, description="recompute each transformer block in backward")
    rdzv_endpoint: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$",
        description="nnodes > 1: host:port of the c10d rendezvous, reachable from every node")
    rdzv_timeout_s: float = Field(600.0, gt=0, description="nnodes > 1: seconds for all nodes to join")
    node_launcher: str | None = Field(
        None, description="nnodes > 1: shell command template that starts one node's torchrun agent; "
                          "{command} (the agent's command line), {node_rank}, {nnodes}, {rdzv_endpoint}, {cwd}; "
                          "e.g. 'ssh node{node_rank} \"cd {cwd} && {command}\"' or \"srun -N1 -n1 -r {node_rank} {command}\"")
    old_logp: Literal["auto", "recompute", "behaviour"] = Field(
        "auto", description="pi_old for the PPO ratio: auto takes the rollout's behaviour log-probs when they "
                            "are the same quantity (the run's own float32 hf rollout of the start weights at "
                            "temperature 1), else recomputes; behaviour insists (error with the reasons)")


    @model_validator(mode="after")
    def _nodes(self) -> "TrainConfig":
        if self.nnodes > 1 and (not self.rdzv_endpoint or not self.node_launcher):
            raise ValueError(f"train.nnodes={self.nnodes} needs train.rdzv_endpoint (host:port on the first node) "
                             f"and train.node_launcher (e.g. 'ssh node{{node_rank}} \"cd {{cwd}} && {{command}}\"')")
        if self.node_launcher is not None:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.node_launcher) if f is not None}
            if "command" not in fields or not fields <= set(NODE_LAUNCHER_FIELDS):
                raise ValueError(f"train.node_launcher {self.node_launcher!r}: must contain {{command}} and no "
                                 f"placeholders but {{{'}, {'.join(NODE_LAUNCHER_FIELDS)}}} (write {{{{ }}}} for "
                                 f"literal braces)")
        return self


class EvalConfig(_Model):
    every: int = Field(1, ge=0, description="evaluate every k iterations (0: never)")
    max_prompts: int | None = Field(None, gt=0, description="evaluate the first N rows of the eval split (default all)")
    max_new_tokens: int = Field(32, gt=0, description="greedy response budget (prompts may have the engine's "
                                                      "context minus this)")
    token_budget: int = Field(16384, gt=0, description="hf engine: prompt+response tokens per eval batch")


class DataConfig(_Model):
    train: str = Field(description="prompts: Parquet/JSONL with columns prompt (text) or messages (chat), answer, domain")
    eval: str | None = Field(None, description="eval prompts, same columns")
    chat_template: bool = Field(False, description="wrap each plain-text prompt as one user message in the student "
                                                   "tokenizer's chat template (a `messages` column always uses it)")
    verifiers: dict[str, str] = Field(default_factory=dict, description="domain -> verifier name (exact, math, ...) "
                                      "where it is not the domain's own; none: the domain has no verifier "
                                      "(evaluation skips it; kdrl refuses it)")


class OfflineGenerateConfig(_Model):
    model: str = Field("route", description="teacher NAME that samples every prompt, or route: each prompt "
                                            "is sampled by the teacher of its domain")
    prompts: int = Field(256, gt=0, description="prompts drawn from data.train (a permutation by the run seed; "
                                                "at most the size of the set)")
    group_size: int = Field(1, gt=0, description="responses sampled per prompt")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int | None = Field(None, gt=0, description="default: rollout.max_new_tokens")


class OfflineFilterConfig(_Model):
    min_reward: float | None = Field(None, description="drop rows whose verifier reward is below this (and rows "
                                                       "without a reward)")
    min_teacher_logp_per_token: float | None = Field(
        None, le=0, description="drop rows whose mean combined teacher log-prob per response token is below this")


class OfflineConfig(_Model):
    """The offline phase: a warm start by SFT on teacher-generated or given responses, before iteration 0."""
    source: Literal["generate", "dataset"] = Field("generate", description="generate: teachers sample "
                                                   "responses (offline.generate); dataset: offline.dataset")
    dataset: str | None = Field(None, description="Parquet/JSONL of prompt+response (text) or prompt_ids+"
                                                  "response_ids; optional sample_id, prompt_id, domain, reward, answer")
    generate: OfflineGenerateConfig = Field(default_factory=OfflineGenerateConfig)
    loss: Literal["sft"] = Field("sft", description="sft: mean negative log-likelihood of the response tokens")
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    epochs: int = Field(1, gt=0, description="passes over the kept rows")
    mini_batches: int = Field(4, gt=0, description="optimizer steps per epoch")
    lr: float | None = Field(None, gt=0, description="default: train.lr")
    filter: OfflineFilterConfig = Field(default_factory=OfflineFilterConfig)

    @model_validator(mode="after")
    def _source(self) -> "OfflineConfig":
        if self.source == "dataset" and not self.dataset:
            raise ValueError("offline.source=dataset needs offline.dataset (a Parquet/JSONL path)")
        if self.source == "generate" and self.dataset:
            raise ValueError("offline.dataset is read only with offline.source: dataset; set the source or "
                             "remove the dataset")
        return self


Devices = list[int] | int


class PlacementConfig(_Model):
    """Where each engine and the trainer run on a node (see docs/architecture.md, `opd plan`).
    Each role takes GPU ids or a count (ids then assigned from 0); a teacher with teachers[].url is
    served by an already-running server and takes no GPU here. Stages time-share the GPUs: every engine
    of one stage is released (its process ended) before the next stage starts."""
    gpus: int | None = Field(None, gt=0, description="GPUs per node (default: opd plan --gpus, else "
                                                     "train.nproc_per_node)")
    gpu_memory_gib: float | None = Field(None, gt=0, description="memory per GPU (default: opd plan "
                                                                 "--gpu-memory, else 80)")
    rollout: Devices | None = Field(None, description="GPUs of the rollout engine (tp x dp of rollout.vllm)")
    teachers: dict[str, Devices] = Field(default_factory=dict, description="NAME -> GPUs of that teacher's "
                                                                          "scoring engine")
    reference: Devices | None = Field(None, description="GPUs of the reference scorer")
    trainer: Devices | None = Field(None, description="GPUs of the FSDP ranks on a node (nproc_per_node)")
    sleep_mode: Literal["auto", "off"] = Field("auto", description="auto: vLLM sleep/wake_up instead of "
                                               "ending the engine where the platform supports it (CUDA)")


class ToyWorldConfig(_Model):
    dir: str = Field("~/.cache/opd/toy", description="where the world is built and cached")
    size: Literal["demo", "test", "strong-to-weak"] = "demo"
    seed: int = 0
