"""The run configuration: one validated schema, the only place defaults live.

A run is described by one YAML file plus dotted overrides (`--set train.lr=1e-4`), validated against this
schema before anything heavy is imported or loaded. Reading, overrides and the user-facing validation errors
are in `fedmole.config_io`; the Markdown reference generated from the schema is `fedmole.config_docs`.

Algorithm sections are validated against the schema registered for `algorithm.name` (see `algorithm`, the one
registry of methods); each method declares its own keys there, and what it can do as class attributes
(`needs_aux`, `finetune_eval`, ...) that the rest of fedmole reads instead of looking at the key mixins.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from fedmole.errors import did_you_mean
from fedmole.feasibility import feasibility_problem, tier_rank_map


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and every number
    is finite (`.inf` and `.nan` are refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


SEED_MAX = 2**32 - 1  # seeds feed numpy and torch generators; both take 0..2^32-1 everywhere


# --------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    name: str = Field(
        "tiny-llama",
        description="built-in name (smollm2-135m, tiny-llama, tiny-olmoe), a Hugging Face id, or a local directory",
    )
    tokenizer: str | None = Field(None, description="tokenizer id or path; default: the model's own")
    revision: str | None = Field(None, description="Hugging Face revision (branch, tag or commit)")
    gguf_file: str | None = Field(None, description="GGUF file inside `name` to load (dequantised)")
    trust_remote_code: bool = Field(False, description="allow model code from the hub (only for models you trust)")


# ---------------------------------------------------------------------------------------------- data
class ColumnMap(Section):
    """Which column of a JSONL/CSV/HF dataset holds each field of the example schema."""

    instruction: str = Field("instruction", description="column holding the instruction")
    context: str | None = Field("context", description="column holding extra input (optional)")
    response: str = Field("response", description="column holding the target response")
    choices: str | None = Field(None, description="column holding classification choices (list or JSON list)")
    label: str | None = Field(None, description="column holding the gold choice (index or text)")
    task: str | None = Field("task", description="column naming the task (for filters and partitions)")
    domain: str | None = Field("domain", description="column naming the domain (for filters and partitions)")


class DataConfig(Section):
    source: Literal["wordnet", "jsonl", "json", "csv", "hf", "dolly", "snli", "natural_instructions", "alpaca"] = Field(
        "wordnet", description="where examples come from (see README: Your own data)"
    )
    path: str | None = Field(None, description="file, directory or HF dataset id (source-specific); for wordnet the WordNet 'dict' directory (default /usr/share/wordnet)")
    split: str = Field("train", description="split to read from an HF dataset")
    columns: ColumnMap = Field(default_factory=ColumnMap)
    tasks: list[str] | None = Field(None, description="keep only these tasks")
    domains: list[str] | None = Field(None, description="keep only these domains")
    max_examples: int | None = Field(None, ge=1, description="sample this many examples (seeded) after filtering")
    prompt: Literal["alpaca", "chat", "plain"] = Field(
        "alpaca", description="prompt template; chat uses the tokenizer's chat template"
    )
    system_prompt: str | None = Field(None, description="system message for the chat template")
    ni_num_tasks: int = Field(100, ge=1, description="natural_instructions: keep the N largest train tasks")


# ----------------------------------------------------------------------------------------- partition
class SplitRatios(Section):
    train: float = Field(0.8, ge=0, description="share of each client's data for training")
    aux: float = Field(0.0, ge=0, description="share for the aux split (RSEA embeddings, FDLoRA fusion)")
    val: float = Field(0.1, ge=0, description="share for validation (selects the reported round)")
    test: float = Field(0.1, ge=0, description="share for test")

    @model_validator(mode="after")
    def _positive(self):
        if self.train <= 0:
            raise ValueError("partition.splits.train must be > 0 (every client needs training data)")
        return self


class SplitCaps(Section):
    aux: int | None = Field(200, ge=1, description="at most this many aux examples per client (null: no cap)")
    val: int | None = Field(200, ge=1, description="at most this many val examples per client")
    test: int | None = Field(200, ge=1, description="at most this many test examples per client")


class PartitionConfig(Section):
    scheme: Literal["iid", "dirichlet", "meta", "quantity_skew"] = Field("iid", description="how examples are split over clients")
    by: str = Field("domain", description="column for dirichlet/meta: task, domain, label (gold choice index) or a key of the example's extra")
    alpha: float = Field(1.0, gt=0, description="Dirichlet concentration (dirichlet, quantity_skew)")
    min_size: int = Field(10, ge=1, description="minimum examples per client (dirichlet, quantity_skew)")
    groups_per_client: int = Field(1, ge=1, description="meta: number of groups (values of `by`) per client")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="partition seed; default federation.seed")
    splits: SplitRatios = Field(default_factory=SplitRatios)
    caps: SplitCaps = Field(default_factory=SplitCaps)


# ----------------------------------------------------------------------------------------- algorithm
class AlgorithmConfig(Section):
    """Base for algorithm sections; `name` selects the registered schema."""

    name: str

    # What the rest of fedmole needs to know about the method, declared by each method's section (subclasses
    # override these class attributes; `algorithm` checks that a declared capability has its keys).
    module: ClassVar[str] = ""  # the module implementing the method, set by `algorithm`
    needs_aux: ClassVar[bool] = False  # the round loop: clients compute statistics on an aux split
    finetune_eval: ClassVar[bool] = False  # `personalize_by_finetune`: evaluate each client after local training
    server_optimizer: ClassVar[bool] = False  # `server_opt`: the server applies an optimiser to the aggregate
    rank_tier_eval: ClassVar[bool] = False  # `tier_eval`: lower tiers also evaluate the global LoRA at their rank
    peft_export: ClassVar[bool] = False  # plain LoRA (`rank`, `alpha`) that `fedmole export` writes in peft format

    @property
    def draws_dp_noise(self) -> bool:
        """Whether the method's clients draw DP noise of their own, besides the `dp` section's (run.log warns
        when `dp.noise: seeded` makes it reproducible)."""
        return False

    def cross_check(self, cfg: "Config") -> None:
        """Checks of this section against other sections (e.g. `tiers`); raise ValueError to reject."""


CAPABILITY_KEYS = {  # capability -> the key of the section it reads
    "finetune_eval": "personalize_by_finetune",
    "server_optimizer": "server_opt",
    "rank_tier_eval": "tier_eval",
    "peft_export": "alpha",
}
ALGORITHMS: dict[str, type[AlgorithmConfig]] = {}  # name -> section schema; the one registry of methods


def algorithm(name: str, module: str):
    """Class decorator registering a method: its section schema (the decorated class, whose `name` key defaults to
    `name`) and the module implementing it (`build_adapters`, `Server`, `Client`), which
    `fedmole.algorithms.get_algorithm` imports only when a run needs it."""

    def register(cls: type[AlgorithmConfig]) -> type[AlgorithmConfig]:
        if cls.model_fields["name"].default != name:
            raise TypeError(f"{cls.__name__} is registered as {name!r} but its `name` key defaults to "
                            f"{cls.model_fields['name'].default!r}")
        missing = [f"{flag} (key `{key}`)" for flag, key in CAPABILITY_KEYS.items()
                   if getattr(cls, flag) and key not in cls.model_fields]
        if missing:
            raise TypeError(f"{cls.__name__} declares {', '.join(missing)} without the key")
        cls.module = module
        ALGORITHMS[name] = cls
        return cls

    return register


class LoRAKeys(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; scaling alpha/r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module-name suffixes (or regexes starting with '^') to adapt",
    )


ADAPTIVE_SERVER_OPTIMIZERS = ("fedadagrad", "fedadam", "fedyogi")


class ServerOptConfig(Section):
    """Server optimiser applied to the aggregated delta Δ_t = Σ p_i x_i − x_t of every global tensor
    (baselines.md §3). fedavg with lr 1 is plain FedAvg."""

    name: Literal["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] = Field(
        "fedavg", description="fedavg, fedavgm (server momentum), fedadagrad, fedadam, fedyogi (FedOpt)"
    )
    lr: float | None = Field(
        None, gt=0, description="server learning rate η; null: 1 for fedavg, 1 − momentum for fedavgm, "
        "1e-3 for fedadagrad/fedadam/fedyogi"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm: momentum β on the pseudo-gradient −Δ_t")
    nesterov: bool = Field(False, description="fedavgm: Nesterov momentum (x −= η (g + β v))")
    beta1: float = Field(0.9, ge=0, lt=1, description="FedOpt: first-moment decay β1")
    beta2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi: second-moment decay β2")
    tau: float = Field(1e-4, gt=0, description="FedOpt: adaptivity τ (v starts at τ²); compare with |Δ| per round")

    @model_validator(mode="before")
    @classmethod
    def _default_lr(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("lr") is None:
            name = data.get("name", cls.model_fields["name"].default)
            momentum = data.get("momentum", cls.model_fields["momentum"].default)
            if name == cls.model_fields["name"].default and cls.model_fields["lr"].default is not None:
                data = {**data, "lr": cls.model_fields["lr"].default}  # a method's own outer-optimiser default
            elif name == "fedavg":
                data = {**data, "lr": 1.0}
            elif name == "fedavgm" and isinstance(momentum, (int, float)) and 0 <= momentum < 1:
                data = {**data, "lr": 1.0 - momentum}
            elif name in ADAPTIVE_SERVER_OPTIMIZERS:
                data = {**data, "lr": 1e-3}
        return data

    @model_validator(mode="after")
    def _no_unused_keys(self):
        owners = {"momentum": ("fedavgm",), "nesterov": ("fedavgm",), "beta1": ADAPTIVE_SERVER_OPTIMIZERS,
                  "beta2": ("fedadam", "fedyogi"), "tau": ADAPTIVE_SERVER_OPTIMIZERS}
        for key, users in owners.items():
            if self.name not in users and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(
                    f"server_opt.{key}={getattr(self, key)} has no effect with server_opt.name={self.name}; "
                    f"it is used by {', '.join(users)}: remove it or choose one of those optimisers"
                )
        return self


class ServerOptKeys(Section):
    server_opt: ServerOptConfig = Field(default_factory=ServerOptConfig, description="server optimiser")


class WeightingKeys(Section):
    weighting: Literal["data_size", "uniform"] = Field("data_size", description="client weights p_i in FedAvg")


class FinetuneEvalKeys(Section):
    personalize_by_finetune: bool = Field(
        False, description="also evaluate each client's model right after its local training (label: personalized)"
    )


class ProxKeys(Section):
    prox_mu: float = Field(0.0, ge=0, description="FedProx μ: adds μ (x − x_t) to every trainable gradient; 0 = off")


@algorithm("fedit", module="fedmole.algorithms.fedit")
class FedITConfig(AlgorithmConfig, LoRAKeys, WeightingKeys, FinetuneEvalKeys, ProxKeys, ServerOptKeys):
    """FedIT: FedAvg of LoRA A and B (FedIT-FT with `personalize_by_finetune`), server optimisers, FedProx."""

    name: Literal["fedit"] = "fedit"
    finetune_eval: ClassVar[bool] = True
    server_optimizer: ClassVar[bool] = True
    peft_export: ClassVar[bool] = True


@algorithm("local", module="fedmole.algorithms.local")
class LocalConfig(AlgorithmConfig, LoRAKeys):
    """Local-only training: each client trains its own LoRA; nothing is communicated."""

    name: Literal["local"] = "local"
    peft_export: ClassVar[bool] = True


# ------------------------------------------------------------------------ baselines (baselines.md §2)
class RankTierLoRAConfig(AlgorithmConfig, LoRAKeys):
    """LoRA methods whose client ranks follow the compute tiers: r_i = rank * k_i / K, K the highest tier
    level (`tiers` section, shared with FLAME). `rank` is the highest rank r_max."""

    def cross_check(self, cfg: "Config") -> None:
        if cfg.tiers.levels is not None:  # otherwise K depends on the model; checked once it is loaded
            K = cfg.tiers.levels[0]
            tier_rank_map(self.rank, K, sorted({*cfg.tiers.levels, *(k for k in cfg.tiers.per_client or [] if k <= K)}))


class TierEvalKeys(Section):
    tier_eval: Literal["own", "budget", "none"] = Field(
        "own", description="also evaluate each client below the highest tier on the model it can run: the "
        "global LoRA at its own rank r_i (the model `fedmole export --client` writes), labelled global_k{k_i} "
        "like FLAME's tier-wise evaluation (own); only that model, so each client is evaluated once at its "
        "budget (budget); or only the global model (none)"
    )


@algorithm("ffa_lora", module="fedmole.algorithms.ffa_lora")
class FFALoRAConfig(AlgorithmConfig, LoRAKeys, WeightingKeys, FinetuneEvalKeys, ProxKeys, ServerOptKeys):
    """FFA-LoRA: A frozen at the seeded shared initialisation; only B is trained and averaged."""

    name: Literal["ffa_lora"] = "ffa_lora"
    finetune_eval: ClassVar[bool] = True
    server_optimizer: ClassVar[bool] = True
    peft_export: ClassVar[bool] = True


@algorithm("hetlora", module="fedmole.algorithms.hetlora")
class HetLoRAConfig(RankTierLoRAConfig, TierEvalKeys, FinetuneEvalKeys, ProxKeys, ServerOptKeys):
    """HetLoRA: tier ranks, truncation on dispatch, zero-padding + norm-weighted aggregation, optional self-pruning."""

    name: Literal["hetlora"] = "hetlora"
    finetune_eval: ClassVar[bool] = True
    server_optimizer: ClassVar[bool] = True
    rank_tier_eval: ClassVar[bool] = True
    peft_export: ClassVar[bool] = True
    norm_weights: Literal["per_matrix", "per_client"] = Field(
        "per_matrix", description="aggregation weight ‖update‖_F per adapted matrix, or summed over a client's matrices"
    )
    self_pruning: bool = Field(False, description="rank self-pruning: tail regulariser + drop the tail when it shrinks")
    prune_gamma: float = Field(
        0.75, gt=0, lt=1, description="self-pruning keeps the first ceil(γ r_i) components, so a client prunes only "
        "while ceil(γ r_i) < r_i, i.e. r_i >= 1/(1-γ): never at rank 1, at rank 2 only with γ <= 0.5"
    )
    prune_lambda: float = Field(1e-3, ge=0, description="self-pruning regulariser weight λ")

    def cross_check(self, cfg: "Config") -> None:
        super().cross_check(cfg)
        if self.self_pruning and math.ceil(self.prune_gamma * self.rank) >= self.rank:
            raise ValueError(
                f"algorithm.self_pruning is on but algorithm.prune_gamma={self.prune_gamma} keeps "
                f"ceil({self.prune_gamma}*{self.rank}) = {self.rank} of algorithm.rank={self.rank} components, so "
                f"nothing can be pruned; choose prune_gamma <= {(self.rank - 1) / self.rank:.3f}"
            )


@algorithm("flexlora", module="fedmole.algorithms.flexlora")
class FlexLoRAConfig(RankTierLoRAConfig, TierEvalKeys, WeightingKeys, FinetuneEvalKeys, ProxKeys, ServerOptKeys):
    """FlexLoRA: tier ranks, average of the scaled products B_i A_i, redistribution by truncated SVD."""

    name: Literal["flexlora"] = "flexlora"
    finetune_eval: ClassVar[bool] = True
    server_optimizer: ClassVar[bool] = True
    rank_tier_eval: ClassVar[bool] = True
    peft_export: ClassVar[bool] = True


@algorithm("flora", module="fedmole.algorithms.flora")
class FLoRAConfig(RankTierLoRAConfig, WeightingKeys, FinetuneEvalKeys, ProxKeys):
    """FLoRA: tier ranks, stacking aggregation merged into the base, fresh LoRA every round."""

    name: Literal["flora"] = "flora"
    finetune_eval: ClassVar[bool] = True
    peft_export: ClassVar[bool] = True

    def cross_check(self, cfg: "Config") -> None:
        super().cross_check(cfg)
        if cfg.replies.robust != "mean":
            raise ValueError(
                f"replies.robust={cfg.replies.robust} with algorithm.name=flora: FLoRA's stacking is the exact "
                f"weighted sum of the clients' updates and has no robust variant; set replies.robust=mean"
            )


class FDLoRAOuterOptConfig(ServerOptConfig):
    """FDLoRA's outer optimiser: SGD with lr 1, momentum 0.5, Nesterov, on the pseudo-gradient."""

    name: Literal["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] = Field(
        "fedavgm", description="outer optimiser; fedavgm with nesterov is the reference's Nesterov SGD"
    )
    lr: float | None = Field(1.0, gt=0, description="outer learning rate η (null: 1 for fedavgm, the generic default otherwise)")
    momentum: float = Field(0.5, ge=0, lt=1, description="fedavgm: momentum β on the pseudo-gradient")
    nesterov: bool = Field(True, description="fedavgm: Nesterov momentum")


@algorithm("fdlora", module="fedmole.algorithms.fdlora")
class FDLoRAConfig(AlgorithmConfig, LoRAKeys, WeightingKeys, ProxKeys, ServerOptKeys):
    """FDLoRA: shared + private LoRA, outer Nesterov SGD, fusion weights searched on the aux split."""

    name: Literal["fdlora"] = "fdlora"
    needs_aux: ClassVar[bool] = True
    server_optimizer: ClassVar[bool] = True
    peft_export: ClassVar[bool] = True

    weighting: Literal["data_size", "uniform"] = Field(
        "uniform", description="client weights in the pseudo-gradient mean (the reference: unweighted)"
    )
    server_opt: FDLoRAOuterOptConfig = Field(default_factory=FDLoRAOuterOptConfig, description="outer optimiser")
    warmup_round: bool = Field(True, description="round 1 is purely local training followed by plain averaging")
    sync_freq: int = Field(5, ge=1, description="snapshot the trained shared adapter as the private one every N rounds")
    fusion_budget: int = Field(5, ge=1, description="objective evaluations of the fusion-weight search")
    fusion_batches: int = Field(5, ge=1, description="aux batches in the fusion objective")
    fusion_l1: float = Field(0.05, ge=0, description="fusion objective: + fusion_l1 * mean|w|")
    fusion_bound: float = Field(1.5, gt=0, description="fusion weights are searched in [-bound, bound]")


@algorithm("flame", module="fedmole.algorithms.flame")
class FLAMEConfig(AlgorithmConfig, LoRAKeys, ProxKeys, ServerOptKeys):
    """FLAME (arXiv 2506.16600): clients activate k_i experts of a sparse MoE (their tier, from the shared
    `tiers` section), a learnable rescaler restores the MoE output scale, and the server averages each
    expert's LoRA with activation-aware weights (a_i/S_i)^t |D_i|. See docs/flame.md."""

    name: Literal["flame"] = "flame"
    server_optimizer: ClassVar[bool] = True
    peft_export: ClassVar[bool] = True
    experts: Literal["auto", "pretrained", "lora"] = Field(
        "auto", description="pretrained: LoRA on the experts of a sparse-MoE base (OLMoE, Mixtral, Qwen-MoE); "
        "lora: a pool of LoRA experts with a trained router on each target module of a dense base; "
        "auto: pretrained when the model has supported MoE blocks, else lora"
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["gate_proj", "up_proj", "down_proj"],
        description="pretrained: which expert projections get a LoRA (subset of gate_proj, up_proj, down_proj); "
        "lora: the linear layers that get a pool of LoRA experts",
    )
    lora_on_attention: bool = Field(
        False, description="also a plain LoRA on q/k/v/o_proj (non-expert, FedAvg by data size)"
    )
    num_experts: int = Field(8, ge=1, description="lora: experts per pool (M)")
    top_k: int = Field(4, ge=1, description="lora: experts per token at full compute (K)")
    dispatch: Literal["dense", "sparse"] = Field(
        "dense", description="lora: how a pool computes its experts: dense computes A_j x for all M experts and "
        "masks the unchosen (one dropout mask per token); sparse groups the tokens by their chosen experts and "
        "runs only those, so compute falls with k (one dropout mask per token and expert)"
    )
    temperature: float = Field(2.0, ge=0, description="t in gamma = (a_i/S_i)^t |D_i|; 0 = data-size FedAvg")
    freq_normaliser: Literal["tokens", "steps"] = Field(
        "tokens", description="S_i: non-padding tokens of the round's training passes, or local steps"
    )
    rescaler: Literal["learned", "fixed", "none"] = Field(
        "learned", description="learned s (FLAME); fixed s = K/k_i (ablation); none: s = 1"
    )
    rescaler_granularity: Literal["layer", "client"] = Field(
        "layer", description="learned: one s per MoE layer (per adapted module for lora) or one per client"
    )
    rescaler_init: Literal["mass_ratio", "one"] = Field(
        "mass_ratio", description="learned, new client without a tier average: mean over the first batch's "
        "tokens of sum_topK p / sum_topk_i p per layer, or 1"
    )
    rescaler_lr_scale: float = Field(10.0, gt=0, description="learned: rescaler lr = train lr x this")
    rescaler_full_k: Literal["frozen", "learned"] = Field(
        "frozen", description="learned: clients with k_i = K keep s = 1 (frozen) or learn it too"
    )
    train_router: bool = Field(
        False, description="pretrained: train the router (FedAvg by data size, plus load-balancing loss)"
    )
    router_aux_loss_coef: float = Field(0.01, ge=0, description="load-balancing loss weight for trained routers")
    skip_unactivated_upload: bool = Field(
        True, description="clients do not upload experts they never activated (their weight is 0 when t > 0)"
    )
    tier_eval: Literal["own", "all", "budget", "none"] = Field(
        "own", description="tier-wise evaluation of the global model at k < K with the tier-average s: on each "
        "client at its own tier besides the full model (own), at every tier (all), at its own tier only so each "
        "client is evaluated once, on the model its budget runs (budget), or not at all"
    )

    @model_validator(mode="after")
    def _check_flame(self):
        # keys set away from their defaults (a resolved config.yaml lists every key, so "was it written"
        # cannot tell a user's choice from a default)
        fields = type(self).model_fields
        given = {k for k, f in fields.items() if f.default is not None and getattr(self, k) != f.default}
        if self.experts == "pretrained":
            for key in ("num_experts", "top_k", "dispatch"):
                if key in given:
                    raise ValueError(
                        f"algorithm.{key} applies to the LoRA-expert pools of experts=lora, but algorithm.experts is "
                        f"pretrained (the model's own experts and top-k are used, and only the chosen experts run); "
                        f"remove algorithm.{key}"
                    )
            bad = [m for m in self.target_modules if m not in EXPERT_PROJECTIONS]
            if bad:
                raise ValueError(
                    f"algorithm.target_modules={self.target_modules}: with experts=pretrained only the expert "
                    f"projections {list(EXPERT_PROJECTIONS)} can be adapted (got {bad}); attention LoRA is "
                    f"algorithm.lora_on_attention=true"
                )
        if self.experts == "lora" and self.train_router:
            raise ValueError("algorithm.train_router=true applies to experts=pretrained; the router of the "
                             "LoRA-expert pools (experts=lora) is always trained; remove train_router")
        if self.top_k > self.num_experts:
            raise ValueError(f"algorithm.top_k={self.top_k} exceeds algorithm.num_experts={self.num_experts}; "
                             f"use top_k <= num_experts")
        if self.rescaler != "learned":
            for key in ("rescaler_granularity", "rescaler_init", "rescaler_lr_scale", "rescaler_full_k"):
                if key in given:
                    raise ValueError(f"algorithm.{key} only applies to algorithm.rescaler=learned (got rescaler="
                                     f"{self.rescaler}); remove {key}")
        if self.lora_on_attention:
            both = [m for m in self.target_modules if m in ATTENTION_PROJECTIONS]
            if both:
                raise ValueError(f"algorithm.target_modules has {both}, which algorithm.lora_on_attention=true "
                                 f"also adapts; use one or the other")
        return self

    def cross_check(self, cfg: "Config") -> None:
        if cfg.dp.enabled:
            raise ValueError(
                "dp.enabled=true with algorithm.name=flame: FLAME clients upload their per-expert activation "
                "counts in the clear, which differential privacy on model updates does not cover; "
                "set dp.enabled=false (or use a method without activation statistics)"
            )
        if self.experts != "lora":
            return  # K is the model's own top-k, known when the model loads
        for key in ("levels", "per_client"):
            values = getattr(cfg.tiers, key) or []
            bad = sorted({k for k in values if k > self.top_k})
            if bad:
                raise ValueError(
                    f"tiers.{key}={values} has tier values {bad} above K = algorithm.top_k = {self.top_k}; "
                    f"allowed: 1..{self.top_k} (raise algorithm.top_k or lower the tiers)"
                )


EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@algorithm("fedamole", module="fedmole.algorithms.fedamole")
class FedAMoLEConfig(AlgorithmConfig, LoRAKeys):
    """FedAMoLE (arXiv 2411.19128): per-client heterogeneous mixtures of LoRA experts assigned by RSEA.
    Defaults are the paper's (N=30, k_c=2, M=8, top-2, lambda_lb=1e-3); see docs/fedamole.md."""

    name: Literal["fedamole"] = "fedamole"
    needs_aux: ClassVar[bool] = True  # RSEA embeddings come from the aux split
    peft_export: ClassVar[bool] = True

    num_experts: int = Field(30, ge=1, description="N: domain experts per adapted module (global pool)")
    expert_choices: int = Field(2, ge=1, description="k_c: clients each domain expert picks per round")
    min_experts: int = Field(2, ge=1, description="fewest domain experts a client holds per module (>= top_k)")
    max_experts: int = Field(8, ge=1, description="M: most domain experts a client holds per module")
    top_k: int = Field(2, ge=1, description="domain experts each token is routed to")
    lb_weight: float = Field(1e-3, ge=0, description="lambda_lb: weight of the load-balancing loss (summed over modules)")
    shared_expert: bool = Field(True, description="false = FedAMoLE-S: no always-on shared expert")
    static_arch: bool = Field(False, description="FedAMoLE-R: keep the random round-0 assignment for every round")
    random_dispatch: bool = Field(False, description="draw a new random assignment every round instead of RSEA")
    homogeneous: bool = Field(
        False, description="FedAMoLE-H: every client holds exactly N*k_c/C experts per module (C must divide N*k_c)"
    )
    weighting: Literal["uniform", "data_size"] = Field(
        "uniform", description="averaging weights for experts, router and embeddings (the paper: uniform)"
    )
    evaluate_dispatched: bool = Field(
        True, description="also evaluate the dispatched model (aggregated experts, the client's architecture) "
        "before local training, labelled `global`"
    )
    dp_embeddings: bool = Field(
        False, description="privatise the uploaded RSEA embeddings (the paper's DP variant: Gamma-magnitude "
        "noise + clipping); independent of the `dp` section, which privatises model updates"
    )
    dp_eta: float = Field(100.0, gt=0, description="eta: the noise rate; E|noise_i| = rank/(2 eta), smaller is noisier")
    dp_embedding_clip: float | None = Field(
        None, gt=0, description="clip bound tau for the noisy embeddings; null = the largest per-batch mean "
        "embedding norm seen on the aux split (per vector)"
    )

    @model_validator(mode="after")
    def _check_section(self):
        if not self.top_k <= self.min_experts <= self.max_experts:
            raise ValueError(
                f"algorithm.top_k ({self.top_k}) <= algorithm.min_experts ({self.min_experts}) <= "
                f"algorithm.max_experts ({self.max_experts}) must hold: every client routes each token to top_k "
                f"of its own experts; e.g. set min_experts={max(self.top_k, min(self.min_experts, self.max_experts))}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"algorithm.top_k ({self.top_k}) exceeds algorithm.num_experts ({self.num_experts})")
        if self.static_arch and self.random_dispatch:
            raise ValueError("algorithm.static_arch and algorithm.random_dispatch are exclusive; set one of them false")
        if self.dp_embeddings and not self.uses_embeddings:
            raise ValueError(
                "algorithm.dp_embeddings privatises the RSEA embeddings, which static_arch/random_dispatch never "
                "compute; set algorithm.dp_embeddings=false or use RSEA"
            )
        if self.dp_embeddings and self.rank < 2:
            raise ValueError(
                f"algorithm.dp_embeddings with algorithm.rank={self.rank}: at rank 1 the noise magnitude is "
                f"Gamma(shape=1), whose signed density is unbounded at 0, so the release has no finite epsilon "
                f"(docs/fedamole.md, privacy cost); use algorithm.rank >= 2"
            )
        return self

    @property
    def uses_embeddings(self) -> bool:
        """Whether clients compute and upload RSEA embeddings (not with a static or random assignment)."""
        return not (self.static_arch or self.random_dispatch)

    @property
    def draws_dp_noise(self) -> bool:
        return self.dp_embeddings

    def cross_check(self, cfg: "Config") -> None:
        fed = cfg.federation
        # RSEA solves each round over that round's clients; a static architecture is drawn once for everyone
        clients = fed.num_clients if self.static_arch else cfg.clients_per_round
        what = "federation.num_clients" if self.static_arch else "clients per round"
        problem = feasibility_problem(self.num_experts, self.expert_choices, clients, self.min_experts,
                                      self.max_experts, self.homogeneous)
        if problem is not None:
            raise ValueError(
                f"fedamole cannot assign experts with num_experts={self.num_experts}, "
                f"expert_choices={self.expert_choices}, min_experts={self.min_experts}, "
                f"max_experts={self.max_experts} and {clients} {what}: {problem}"
            )
        if cfg.dp.enabled and self.uses_embeddings:
            raise ValueError(
                "dp.enabled=true with algorithm.name=fedamole: clients upload RSEA embeddings of their aux data, "
                "which client-level DP on model updates does not cover (it would treat them as updates from "
                "zero); set dp.enabled=false and use algorithm.dp_embeddings=true (the paper's embedding DP), or "
                "keep dp.enabled with algorithm.static_arch=true or random_dispatch=true (no embeddings)"
            )
        if cfg.eval.init and cfg.eval.clients is not None and cfg.eval.clients < fed.num_clients \
                and not self.static_arch:
            raise ValueError(
                f"eval.init=true evaluates round 1's initial architecture, which fedamole draws over every client, "
                f"but eval.clients={cfg.eval.clients} evaluates only some of the {fed.num_clients}; set "
                f"eval.clients=null or eval.init=false"
            )
        if cfg.eval.init and cfg.clients_per_round < fed.num_clients and not self.static_arch:
            raise ValueError(
                "eval.init=true needs an initial architecture for every client, but with partial participation "
                f"(federation.clients_per_round={cfg.clients_per_round} < num_clients={fed.num_clients}) fedamole "
                "draws architectures per round; set eval.init=false (the round-0 model is the base model: B=0) "
                "or algorithm.static_arch=true"
            )


# ---------------------------------------------------------------------------------------- federation
class FederationConfig(Section):
    num_clients: int = Field(3, ge=1, description="number of clients (partitions)")
    clients_per_round: int | None = Field(None, ge=1, description="clients sampled per round; default all")
    rounds: int = Field(2, ge=1, description="communication rounds")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="seed of everything: initialisation, sampling, local "
                      "training (0 to 2^32-1)")
    round_deadline: float | None = Field(
        None, gt=0, description="seconds a client may take to reply in a round; later replies are dropped "
        "(null: wait for every client)"
    )
    min_replies: int = Field(
        1, ge=1, description="fewest accepted replies to aggregate a round; with fewer the round is skipped and "
        "the global state is left unchanged"
    )


# -------------------------------------------------------------------------------------- reliability
class FaultsConfig(Section):
    """Seeded fault injection, for experiments and tests: each sampled client independently fails with
    these probabilities (drop first, then crash, then straggle)."""

    drop_probability: float = Field(0.0, ge=0, le=1, description="a client fails before replying")
    crash_probability: float = Field(0.0, ge=0, le=1, description="a client crashes at a random local step")
    straggler_probability: float = Field(
        0.0, ge=0, le=1, description="a client replies after the round deadline (its reply is dropped)"
    )
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="fault seed; default federation.seed")

    @property
    def active(self) -> bool:
        return self.drop_probability + self.crash_probability + self.straggler_probability > 0


class RepliesConfig(Section):
    """What the server accepts from clients, and how shared tensors are combined."""

    max_mb: float = Field(4096.0, gt=0, description="a reply larger than this (MiB of tensors) is rejected")
    robust: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean", description="combination of tensors every replying client sends: the method's (weighted) mean, "
        "or the unweighted coordinate-wise median / trimmed mean"
    )
    trim_ratio: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: share cut at each end per coordinate")
    max_update_norm: float | None = Field(
        None, gt=0, description="norm bounding: a client's update (each uploaded tensor minus what it was sent, "
        "or the tensor itself when it was sent none, e.g. FLoRA's fresh LoRA; statistics such as embeddings "
        "excluded) with a larger L2 norm is scaled down to this norm before aggregation, so that no client "
        "dominates a mean; its norm is recorded as the client's `update_norm`. null = off"
    )
    max_value: float = Field(
        1e6, gt=0, description="a reply holding a tensor value of larger magnitude is rejected (adapter weights "
        "and statistics are far smaller; this keeps sums and squares of accepted values finite)"
    )
    max_examples: int | None = Field(
        None, ge=1, description="largest sample count a reply may claim; null: the client's train split in the "
        "run's partition.json. Set it when clients train on node-local data (Flower `data-path`)"
    )


class DPConfig(Section):
    """Client-level differential privacy on model updates (DP-FedAvg style, noise added on the client)."""

    enabled: bool = Field(False, description="clip every uploaded update and add Gaussian noise")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound C on a client's update (per group, see granularity)")
    noise_multiplier: float = Field(
        1.0, ge=0, le=1000, description="sigma: noise std is sigma * C per coordinate; 0 (no noise, epsilon = inf) "
        "or 0.001 to 1000"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the reported (epsilon, delta)")
    granularity: Literal["update", "expert"] = Field(
        "update", description="clip the whole update to C, or each (module, expert) update to C (sparse experts); "
        "with `expert` the accountant uses sigma / sqrt(most groups any client uploads)"
    )
    noise: Literal["secure", "seeded"] = Field(
        "secure", description="source of every DP noise a client draws (this section's update noise and "
        "fedamole's algorithm.dp_embeddings): secure = a generator seeded from the client's OS entropy, which "
        "nobody else can reproduce; seeded = derived from (federation.seed, round, client), so anyone who knows "
        "the seed, the server included, can regenerate and subtract it: for simulations and bit-exact tests "
        "only (run.log warns)"
    )

    @field_validator("noise_multiplier")
    @classmethod
    def _noise(cls, v: float) -> float:
        if 0 < v < 1e-3:  # the accountant divides by sigma^2 (and overflows below ~1e-150)
            raise ValueError("must be 0 (no noise) or at least 0.001; noise this small gives no privacy")
        return v


# --------------------------------------------------------------------------------------------- tiers
TIER_MIXES = {
    # shares of the levels from the highest to the lowest (flame.md section 4)
    "uniform": None,
    "low-heavy": [0.1, 0.1, 0.3, 0.5],
    "high-heavy": [0.5, 0.3, 0.1, 0.1],
}


class TiersConfig(Section):
    """Client compute tiers, shared by FLAME (k_i active experts) and the rank-tier baselines
    (r_i = rank * k_i / K). Tiers are assigned by a seeded permutation, independent of the data split."""

    levels: list[int] | None = Field(
        None, description="tier values k, highest first; default: the model's K and its halvings down to 1 "
        "(8, 4, 2, 1 for OLMoE)"
    )
    mix: Literal["uniform", "low-heavy", "high-heavy"] = Field(
        "uniform", description="share of clients per level; low/high-heavy need 4 levels"
    )
    shares: list[float] | None = Field(None, description="explicit share per level (overrides mix)")
    per_client: list[int] | None = Field(None, description="explicit k per client (overrides mix and shares)")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="tier assignment seed; default federation.seed")

    @model_validator(mode="after")
    def _check(self):
        for name in ("levels", "per_client"):
            values = getattr(self, name)
            if values is not None and (not values or any(v < 1 for v in values)):
                raise ValueError(f"tiers.{name}={values}: every tier value must be an integer >= 1")
        if self.levels and sorted(self.levels, reverse=True) != self.levels:
            raise ValueError(f"tiers.levels={self.levels} must be listed highest first")
        if self.shares is not None:
            if any(s < 0 for s in self.shares) or sum(self.shares) <= 0:
                raise ValueError(f"tiers.shares={self.shares} must be non-negative with a positive sum")
            if self.levels is not None and len(self.shares) != len(self.levels):
                raise ValueError(f"tiers.shares has {len(self.shares)} entries but tiers.levels has {len(self.levels)}")
        return self


# --------------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    local_steps: int = Field(10, ge=1, description="optimiser steps per client per round")
    batch_size: int = Field(4, ge=1, description="local batch size")
    lr: float = Field(5e-5, gt=0, description="client learning rate in round 1 (cosine: the peak, before round 1)")
    lr_schedule: Literal["exponential", "cosine"] = Field(
        "exponential", description="per-round learning rate, constant within a round: exponential = lr * "
        "lr_decay^(round-1); cosine = lr_min + (lr - lr_min) * (1 + cos(pi * round / rounds)) / 2, the FlowerTune "
        "template's schedule (the last round trains at lr_min)"
    )
    lr_decay: float = Field(0.99, gt=0, le=1, description="exponential schedule: per-round multiplicative decay")
    lr_min: float = Field(0.0, ge=0, description="cosine schedule: the learning rate of the last round")
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="local optimiser, fresh every round")
    optimizer_impl: Literal["auto", "loop", "foreach", "fused"] = Field(
        "auto", description="how torch runs the optimiser's update: auto = torch's choice (a loop over the "
        "parameters on CPU, foreach on CUDA); loop, foreach, or fused (one kernel over all parameters; on CPU "
        "0.10 s against 0.44 s for AdamW over FLAME's 156 M LoRA factors on 2 threads, benchmarks.perf.optimizer: "
        "it matters where every expert trains, as in FLAME). The implementations differ by float rounding, so "
        "results and the state digest depend on it"
    )
    weight_decay: float = Field(0.0, ge=0, description="optimiser weight decay")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd only")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    max_length: int = Field(512, ge=8, description="token limit per example (prompt + response)")
    grad_clip: float | None = Field(None, gt=0, description="max global grad norm; null = no clipping")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype of the frozen base weights; adapters always train in fp32"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (null: torch's default, all cores). Results (and the "
        "state digest) depend on it; 1 is fastest for tiny models and on a busy machine"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("allowed: auto, cpu, cuda, cuda:N")

    @model_validator(mode="after")
    def _cosine(self):
        if self.lr_schedule == "cosine" and self.lr_min > self.lr:
            raise ValueError(f"train.lr_min={self.lr_min} exceeds train.lr={self.lr}: the cosine schedule falls from "
                             f"train.lr to train.lr_min; set lr_min below lr")
        return self


# ---------------------------------------------------------------------------------------------- eval
class GenerationConfig(Section):
    max_new_tokens: int = Field(32, ge=1, description="generation length for ROUGE-L")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (do_sample only)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (do_sample only)")
    num_beams: int = Field(1, ge=1, description="beam search width")


class EvalConfig(Section):
    every: int = Field(1, ge=1, description="evaluate every N rounds (and always after the last)")
    metric: Literal["auto", "accuracy", "rouge_l", "loss"] = Field(
        "auto",
        description="auto: accuracy for classification examples, ROUGE-L F for generation examples (mean score)",
    )
    max_examples: int | None = Field(50, ge=1, description="per client and split")
    batch_size: int = Field(
        8, ge=1, description="evaluation batch size (a client's val and test examples share batches)"
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    select_on: Literal["val_score", "val_loss"] = Field(
        "val_score", description="validation quantity that picks the reported round"
    )
    init: bool = Field(False, description="also evaluate the untrained model as round 0")
    test: Literal["every", "selected"] = Field(
        "every", description="when the test split is evaluated: at every evaluation (every), or only at the "
        "round selected on validation and at the last round (selected: rounds evaluate val only and clients "
        "keep a snapshot of each model they validated, tested after the last round)"
    )
    models: list[str] | None = Field(
        None, description="evaluate only these model labels (glob patterns, e.g. [personalized] or "
        "[global, 'global_k*']); null: every model the method evaluates"
    )
    clients: int | None = Field(
        None, ge=1, description="evaluate the global model on this many clients, drawn per evaluation round "
        "(seeded); null: on every client. With many clients (cross-device) an evaluation of all of them costs "
        "more than the round; personalised evaluations always come from the round's clients"
    )


# -------------------------------------------------------------------------------------------- output
class OutputConfig(Section):
    dir: str = Field("runs", description="parent directory of run directories")
    name: str | None = Field(None, description="run directory name inside output.dir (no `..`, not absolute); "
                             "default: config name + timestamp")
    progress: Literal["auto", "rich", "plain", "none"] = Field(
        "auto", description="progress display: rich bar on a terminal (auto), log lines (plain), or none"
    )
    tensorboard: bool = Field(
        False, description="also write the metrics and bytes per round as TensorBoard event files (run_dir/"
        "tensorboard/, at the end of the run); needs the `tensorboard` package"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = Path(v).parts
        if not v.strip() or Path(v).is_absolute() or any(p in ("..", ".") for p in v.replace("\\", "/").split("/")) \
                or not parts:
            raise ValueError("must be a directory name inside output.dir (e.g. exp1 or sweeps/exp1), without `..`, "
                             "`.` or a leading `/`; to write elsewhere use --out or output.dir")
        return v

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard(cls, v: bool) -> bool:
        import importlib.util

        if v and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("TensorBoard event files need the `tensorboard` package, which is not installed; "
                             "`pip install tensorboard==2.21.0` or set output.tensorboard=false")
        return v


class CommConfig(Section):
    """Communication: every message's serialised bytes go to comm.jsonl (always); these keys compress
    the transfer and cap it."""

    dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="dtype floating tensors travel in, both ways (cast back on arrival); fp32 = no compression"
    )
    budget_mb: float | None = Field(
        None, gt=0, description="cumulative training traffic cap in MB (10^6 bytes): the run stops cleanly before "
        "a round whose worst-case bytes would exceed it (summary: stopped = comm budget); null = no cap"
    )


class FlowerConfig(Section):
    """The Flower engines (`fedmole run --engine flower-sim|flower-deploy`); ignored by the in-process engine."""

    sim_actors: int = Field(
        1, ge=1, description="flower-sim: ClientApp worker processes (Ray actors, one CPU each) running clients in "
        "parallel; capped at the machine's cores and the number of clients. Each holds its own copy of the model. "
        "On a node with several GPUs, at least one per GPU"
    )
    gpus_per_client: float | None = Field(
        None, ge=0, description="flower-sim: share of a GPU Ray reserves for each actor (0.5: two actors per GPU; "
        "whole numbers above 1 for several GPUs each). Ray places the actors over every visible GPU and gives each "
        "its own; null: when train.device is not cpu and CUDA is available, the actors spread evenly over all "
        "visible GPUs, else 0 (CPU only)"
    )
    connect_timeout: float = Field(
        600.0, gt=0, description="seconds the ServerApp waits for one Flower node per client to connect"
    )

    @field_validator("gpus_per_client")
    @classmethod
    def _gpus(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and v != int(v):
            raise ValueError(f"{v}: Ray shares a GPU only in fractions below 1; use a value <= 1 or a whole number "
                             f"of GPUs per actor")
        return v


class CheckpointConfig(Section):
    every: int = Field(1, ge=1, description="checkpoint every N rounds (and always after the last)")
    keep_last: int | None = Field(2, ge=1, description="checkpoints to keep; null keeps all")


# -------------------------------------------------------------------------------------------- config
class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    algorithm: SerializeAsAny[AlgorithmConfig] = Field(default_factory=FedITConfig)  # dump the method's own keys
    federation: FederationConfig = Field(default_factory=FederationConfig)
    tiers: TiersConfig = Field(default_factory=TiersConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    replies: RepliesConfig = Field(default_factory=RepliesConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    comm: CommConfig = Field(default_factory=CommConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    flower: FlowerConfig = Field(default_factory=FlowerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @field_validator("algorithm", mode="before")
    @classmethod
    def _algorithm(cls, v: Any) -> AlgorithmConfig:
        if isinstance(v, AlgorithmConfig):
            return v
        if not isinstance(v, dict):
            raise ValueError("expected a mapping with at least `name`")
        name = v.get("name", "fedit")
        if not isinstance(name, str) or name not in ALGORITHMS:
            raise ValueError(
                f'unknown algorithm "{name}"{did_you_mean(name, ALGORITHMS)}; known: {", ".join(sorted(ALGORITHMS))}'
            )
        return ALGORITHMS[name].model_validate(v)

    @model_validator(mode="after")
    def _cross_checks(self):
        fed, part, alg = self.federation, self.partition, self.algorithm
        if fed.clients_per_round is not None and fed.clients_per_round > fed.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({fed.clients_per_round}) exceeds federation.num_clients "
                f"({fed.num_clients}); use at most {fed.num_clients} or null for all"
            )
        if self.eval.clients is not None and self.eval.clients > fed.num_clients:
            raise ValueError(
                f"eval.clients ({self.eval.clients}) exceeds federation.num_clients ({fed.num_clients}); use at "
                f"most {fed.num_clients} or null for every client"
            )
        if alg.needs_aux and part.splits.aux <= 0:
            raise ValueError(
                f"algorithm {alg.name} computes statistics on an aux split, but partition.splits.aux is "
                f"{part.splits.aux}; set e.g. partition.splits.aux=0.05"
            )
        for key in ("val", "test"):
            if getattr(part.splits, key) <= 0:
                raise ValueError(
                    f"partition.splits.{key} is {getattr(part.splits, key)}; evaluation needs a {key} split, "
                    f"set it above 0 (e.g. 0.1)"
                )
        if fed.min_replies > self.clients_per_round:
            raise ValueError(
                f"federation.min_replies ({fed.min_replies}) exceeds the clients per round ({self.clients_per_round}); "
                f"no round could ever be aggregated. Use at most {self.clients_per_round}"
            )
        tiers = self.tiers
        if tiers.per_client is not None and len(tiers.per_client) != fed.num_clients:
            raise ValueError(
                f"tiers.per_client has {len(tiers.per_client)} entries but federation.num_clients is "
                f"{fed.num_clients}; give one tier value per client"
            )
        if self.train.precision == "fp16" and self.train.device == "cpu":
            raise ValueError("train.precision=fp16 is not supported on train.device=cpu; use fp32 or bf16")
        if self.flower.gpus_per_client and self.train.device == "cpu":
            raise ValueError(f"flower.gpus_per_client={self.flower.gpus_per_client} reserves GPUs for clients that "
                             f"train on train.device=cpu; set train.device=cuda (or auto) or gpus_per_client=0")
        alg.cross_check(self)
        return self

    @property
    def clients_per_round(self) -> int:
        return self.federation.clients_per_round or self.federation.num_clients

    @property
    def partition_seed(self) -> int:
        return self.federation.seed if self.partition.seed is None else self.partition.seed

    def to_dict(self) -> dict:
        """The resolved config as plain data (what `config.yaml` in a run directory holds)."""
        return self.model_dump(mode="json")

