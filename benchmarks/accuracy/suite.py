"""Scenarios, methods and presets of the accuracy suite.

Scenarios (issue 9), all on WordNet 3.0 with SmolLM2-135M-Instruct:
- `task`: one WordNet task per client (definition, pos, synonym, hypernym, usage), like the FedAMoLE
  paper's Natural Instructions setting (one task per client). WordNet has 5 tasks, so 5 clients.
- `dir0.1`, `dir1.0`: Dirichlet over 8 WordNet domains with alpha 0.1 / 1.0, like the paper's Dolly
  setting (Dirichlet over Dolly's 8 categories).
- `tiers`: compute tiers {8, 4, 2, 1} (uniform mix, the same seeded tiers for every method), Dirichlet
  over domains with alpha 1.0: FLAME (dense LoRA-expert variant on SmolLM2), its ablations, HetLoRA and
  FlexLoRA at ranks r * k_i / 8 (the cpu and micro presets: one client per tier). Besides the global model at
  full compute, every method evaluates each lower-tier client on the model it can run (`global_k{k}`), and
  the report compares the methods per budget.

Every run reports the test score of the method's headline model at the round selected on validation.
For the personalisation scenarios the comparison is between personalised models (FedIT-FT, local,
FDLoRA, FedAMoLE and its ablations; FedIT is its global model, as in the paper's tables); for `tiers` it
is the global model at full compute.
"""

from __future__ import annotations

PERSONAL_METHODS = {
    "local": ["algorithm.name=local"],
    "fedit": ["algorithm.name=fedit"],
    "fedit_ft": ["algorithm.name=fedit", "algorithm.personalize_by_finetune=true"],
    "fdlora": ["algorithm.name=fdlora"],
    "fedamole": ["algorithm.name=fedamole"],
    "fedamole_r": ["algorithm.name=fedamole", "algorithm.static_arch=true"],
    "fedamole_s": ["algorithm.name=fedamole", "algorithm.shared_expert=false"],
}

TIER_METHODS = {
    "flame": ["algorithm.name=flame", "algorithm.experts=lora"],
    "flame_no_rescaler": ["algorithm.name=flame", "algorithm.experts=lora", "algorithm.rescaler=none"],
    "flame_t0": ["algorithm.name=flame", "algorithm.experts=lora", "algorithm.temperature=0"],
    "hetlora": ["algorithm.name=hetlora"],
    "flexlora": ["algorithm.name=flexlora"],
}

DOMAINS = ["noun.artifact", "noun.person", "noun.plant", "noun.animal", "noun.act", "noun.communication",
           "noun.state", "noun.attribute"]
DOMAIN_LIST = "[" + ",".join(DOMAINS) + "]"

SCENARIOS = {
    # 5 clients cannot place the paper's 30 experts x 2 holders (max 8 each): 15 experts keep N/C = 3
    "task": {"methods": PERSONAL_METHODS, "fedamole": ["algorithm.num_experts=15"],
             "overrides": ["partition.scheme=meta", "partition.by=task", "federation.num_clients=5"]},
    "dir0.1": {"methods": PERSONAL_METHODS,
               "overrides": ["partition.scheme=dirichlet", "partition.by=domain", "partition.alpha=0.1",
                             f"data.domains={DOMAIN_LIST}"]},
    "dir1.0": {"methods": PERSONAL_METHODS,
               "overrides": ["partition.scheme=dirichlet", "partition.by=domain", "partition.alpha=1.0",
                             f"data.domains={DOMAIN_LIST}"]},
    "tiers": {"methods": TIER_METHODS,
              "overrides": ["partition.scheme=dirichlet", "partition.by=domain", "partition.alpha=1.0",
                            f"data.domains={DOMAIN_LIST}", "tiers.levels=[8,4,2,1]", "tiers.mix=uniform",
                            "algorithm.top_k=8", "algorithm.num_experts=8",
                            "algorithm.target_modules=[q_proj,v_proj]"]},
}

# keys a method does not have are dropped per method (e.g. top_k only exists for flame)
METHOD_ONLY = {"algorithm.top_k": {"flame"}, "algorithm.num_experts": {"flame", "fedamole"}}

PRESETS = {
    # one seed, 2 runs at a time with 1 torch thread each (jobs), 2 rounds of 4 steps at lr 1e-3, 5 validation/
    # test examples per client and split (evaluated in one batch of 10); 4 clients in the Dirichlet scenarios,
    # one client per tier in the tier scenario. Measured on 2 idle CPU cores: 56 minutes for all 26 runs
    # (issue 9 asks for at most 60; docs/RESULTS.md)
    "cpu": {"seeds": [42], "clients": 4, "tier_clients": 4, "jobs": 2, "overrides": [
        "federation.rounds=2", "train.local_steps=4", "train.batch_size=4", "train.lr=1e-3",
        "train.max_length=128", "data.max_examples=3000", "eval.max_examples=5", "eval.batch_size=10",
        "eval.generation.max_new_tokens=16", "train.num_threads=1"],
        "tiers": ["tiers.per_client=[8,4,2,1]"],
        "fedamole": ["algorithm.num_experts=15", "algorithm.evaluate_dispatched=false"]},
    # the papers' scale (FedAMoLE Table 1): 10 clients, 30 rounds, 200 steps of batch 1, lr 5e-5 decaying 0.99
    "gpu": {"seeds": [42, 62, 82], "clients": 10, "tier_clients": 20, "overrides": [
        "federation.rounds=30", "train.local_steps=200", "train.batch_size=1", "train.lr=5e-5",
        "train.max_length=512", "data.max_examples=40000", "eval.max_examples=50",
        "eval.generation.max_new_tokens=64", "train.device=cuda", "eval.batch_size=25"],
        "fedamole": ["algorithm.num_experts=30"]},
    # a tiny-model preset that checks the suite end to end in seconds (used by the tests)
    "micro": {"seeds": [42], "clients": 4, "tier_clients": 4, "overrides": [
        "model.name=tiny-llama", "federation.rounds=1", "train.local_steps=1", "data.max_examples=800",
        "eval.max_examples=2", "eval.generation.max_new_tokens=2", "train.max_length=96"],
        "tiers": ["tiers.per_client=[8,4,2,1]"],
        "fedamole": ["algorithm.num_experts=5", "algorithm.evaluate_dispatched=false"]},
}


# ------------------------------------------------------------------------------------------- powered
# The `powered` preset (issue 15): numbers that can separate methods. Mostly classification (accuracy by
# choice scoring) on the WordNet classification tasks, 150 test and 60 validation examples per client, test
# evaluated only at the round selected on validation and at the last round (`eval.test: selected`), per-example
# outcomes kept, 3 seeds (partition, tiers and initialisation all follow federation.seed). FedIT and FedIT-FT
# are one run (its global and its personalised model); FDLoRA evaluates only its personalised (fused) model.
POWERED_PERSONAL_RUNS = {
    "local": ["algorithm.name=local"],
    "fedit": ["algorithm.name=fedit", "algorithm.personalize_by_finetune=true"],
    "fdlora": ["algorithm.name=fdlora", "eval.models=[personalized]"],
    "fedamole": ["algorithm.name=fedamole"],
    "fedamole_r": ["algorithm.name=fedamole", "algorithm.static_arch=true"],
    "fedamole_s": ["algorithm.name=fedamole", "algorithm.shared_expert=false"],
}
POWERED_PERSONAL_METHODS = {  # method -> (run, model label)
    "local": ("local", "personalized"), "fedit": ("fedit", "global"), "fedit_ft": ("fedit", "personalized"),
    "fdlora": ("fdlora", "personalized"), "fedamole": ("fedamole", "personalized"),
    "fedamole_r": ("fedamole_r", "personalized"), "fedamole_s": ("fedamole_s", "personalized"),
}
# tier scenario: FLAME's dense LoRA-expert variant (8 experts of r = 8 on q, v; top-4 at full compute) against
# HetLoRA / FlexLoRA at r_i = 8 k_i / 4 on the same q, v: the same adapted weights (like for like). Each client
# is evaluated once, on the model its budget runs (`tier_eval: budget`).
POWERED_TIER_RUNS = {
    "flame": ["algorithm.name=flame", "algorithm.experts=lora", "algorithm.num_experts=8", "algorithm.top_k=4"],
    "flame_no_rescaler": ["algorithm.name=flame", "algorithm.experts=lora", "algorithm.num_experts=8",
                          "algorithm.top_k=4", "algorithm.rescaler=none"],
    "flame_t0": ["algorithm.name=flame", "algorithm.experts=lora", "algorithm.num_experts=8", "algorithm.top_k=4",
                 "algorithm.temperature=0"],
    "hetlora": ["algorithm.name=hetlora"],
    "flexlora": ["algorithm.name=flexlora"],
}
POWERED_TIER_METHODS = {m: (m, "global") for m in POWERED_TIER_RUNS}

CHOICE_SPLITS = ["partition.splits.train=0.55", "partition.splits.aux=0.04", "partition.splits.val=0.12",
                 "partition.splits.test=0.29", "partition.caps.aux=20", "partition.caps.val=60",
                 "partition.caps.test=150"]
NOUN_DOMAINS = "data.domains=[" + ",".join(f"noun.{c}" for c in
                                          ("artifact", "person", "plant", "animal", "act", "communication", "state",
                                           "attribute")) + "]"
POWERED_SCENARIOS = {
    # one classification task per client (like Natural Instructions, one task per client)
    "task": {"kind": "personal", "clients": 3, "overrides": [
        "data.tasks=[hypernym_choice,isa,synonym_choice]", "data.max_examples=3000",
        "partition.scheme=meta", "partition.by=task", *CHOICE_SPLITS]},
    # label skew (like SNLI / AG News): WordNet's 8-way noun category task, Dirichlet over the label
    "label0.1": {"kind": "personal", "clients": 3, "overrides": [
        "data.tasks=[category]", "data.max_examples=3000", "partition.scheme=dirichlet", "partition.by=label",
        "partition.alpha=0.1", "partition.min_size=600", *CHOICE_SPLITS]},
    # domain skew (like Dolly's categories): the three word-level choice tasks over 8 noun domains, Dirichlet
    # over the domain
    "domain1.0": {"kind": "personal", "clients": 3, "overrides": [
        "data.tasks=[hypernym_choice,isa,synonym_choice]", NOUN_DOMAINS, "data.max_examples=3000",
        "partition.scheme=dirichlet", "partition.by=domain", "partition.alpha=1.0", "partition.min_size=600",
        *CHOICE_SPLITS]},
    # generation (ROUGE-L): one generation task per client, at the size the budget allows
    "gen": {"kind": "personal", "clients": 3, "overrides": [
        "data.tasks=[definition,hypernym,synonym]", "data.max_examples=2000", "partition.scheme=meta",
        "partition.by=task", "partition.splits.train=0.7", "partition.splits.aux=0.04", "partition.splits.val=0.08",
        "partition.splits.test=0.18", "partition.caps.aux=20", "partition.caps.val=25", "partition.caps.test=50",
        "eval.generation.max_new_tokens=24"]},
    # compute tiers k = 4, 2, 1 of K = 4, three clients each (6 of the 9 train per round), domain skew alpha 1.0
    # over 8 noun domains of the three word-level choice tasks
    "tiers": {"kind": "tiers", "clients": 9, "overrides": [
        "data.tasks=[hypernym_choice,isa,synonym_choice]", NOUN_DOMAINS, "data.max_examples=8000",
        "partition.scheme=dirichlet", "partition.by=domain", "partition.alpha=1.0", "partition.min_size=600",
        *CHOICE_SPLITS, "federation.clients_per_round=6", "tiers.levels=[4,2,1]", "tiers.mix=uniform",
        "algorithm.tier_eval=budget", "algorithm.target_modules=[q_proj,v_proj]"]},
}
POWERED = {
    "seeds": [42, 62, 82], "jobs": 2,
    # 4 rounds of 12 steps of batch 4 at lr 1e-3; validation at rounds 2 and 4 (eval.every=2: the last round is
    # always evaluated), test at the round selected on validation and at the last round
    "overrides": ["data.prompt=plain", "federation.rounds=4", "train.local_steps=12", "train.batch_size=4",
                  "train.lr=1e-3", "train.max_length=128", "train.num_threads=1", "eval.every=2",
                  "eval.test=selected", "eval.max_examples=null", "eval.batch_size=16", "checkpoint.keep_last=1"],
    # N = 3 C experts per module, as the paper's N = 30 for C = 10: each client holds about 6 of them
    "fedamole": ["algorithm.evaluate_dispatched=false"],
    "scenarios": POWERED_SCENARIOS,
    "runs": {"personal": POWERED_PERSONAL_RUNS, "tiers": POWERED_TIER_RUNS},
    "methods": {"personal": POWERED_PERSONAL_METHODS, "tiers": POWERED_TIER_METHODS},
}
# The short-horizon ablation of issue 15: does RSEA's re-assignment start to carry information (clients keeping
# the experts they trained, FedAMoLE pulling ahead of its static random architecture) when the routers and
# expert keys train for longer? The powered preset's label0.1 scenario at 3x the rounds (12 x 12 steps), FedAMoLE
# and FedAMoLE-R, the same 3 seeds and the same data; and FedAMoLE-RD (a fresh random architecture every round,
# `random_dispatch`), which separates RSEA's affinities from the re-dealing itself (added after the first two
# ran: RSEA kept experts at the random rate, yet beat the static architecture at round 12).
HORIZON_RUNS = {**{m: POWERED_PERSONAL_RUNS[m] for m in ("fedamole", "fedamole_r")},
                "fedamole_rd": ["algorithm.name=fedamole", "algorithm.random_dispatch=true"]}
HORIZON = {
    **POWERED,
    "overrides": [o if not o.startswith("federation.rounds=") else "federation.rounds=12" for o in POWERED["overrides"]],
    "scenarios": {"label0.1": POWERED_SCENARIOS["label0.1"]},
    "runs": {"personal": HORIZON_RUNS},
    "methods": {"personal": {m: (m, "personalized") for m in HORIZON_RUNS}},
}
PRESETS["powered"] = POWERED
PRESETS["horizon"] = HORIZON
RUN_TABLE_PRESETS = ("powered", "horizon")  # presets whose methods are (run, model label) pairs


def method_table(preset: str, scenarios: list[str] | None = None) -> dict[str, dict[str, dict]]:
    """scenario -> method -> {"run", "model"}: which run directory and model label each method is scored on.
    In the classic presets every method is its own run, scored on its headline model."""
    if preset not in RUN_TABLE_PRESETS:
        return {scen: {m: {"run": m, "model": None} for m in SCENARIOS[scen]["methods"]}
                for scen in scenarios or list(SCENARIOS)}
    p = PRESETS[preset]
    return {scen: {m: {"run": run, "model": label} for m, (run, label) in p["methods"][p["scenarios"][scen]["kind"]].items()}
            for scen in scenarios or list(p["scenarios"])}


def scenario_names(preset: str) -> list[str]:
    return list(PRESETS[preset]["scenarios"] if preset in RUN_TABLE_PRESETS else SCENARIOS)


def runs(preset: str, scenarios: list[str] | None = None) -> list[dict]:
    """Every (scenario, run, seed) of a preset with its full override list; `method` names the run."""
    if preset in RUN_TABLE_PRESETS:
        return _run_table_runs(PRESETS[preset], scenarios)
    p = PRESETS[preset]
    out = []
    for scen in scenarios or list(SCENARIOS):
        spec = SCENARIOS[scen]
        for method, method_over in spec["methods"].items():
            name = method_over[0].split("=", 1)[1]
            over = list(p["overrides"])
            clients = p["clients"] if scen != "tiers" else p["tier_clients"]
            if scen != "task":
                over.append(f"federation.num_clients={clients}")
            for o in spec["overrides"]:
                key = o.split("=", 1)[0]
                if key in METHOD_ONLY and name not in METHOD_ONLY[key]:
                    continue
                over.append(o)
            if scen == "tiers":
                over += p.get("tiers", [])
            if name == "fedamole":
                over += p["fedamole"] + spec.get("fedamole", [])
            over += method_over
            for seed in p["seeds"]:
                out.append({"scenario": scen, "method": method, "seed": seed,
                            "overrides": over + [f"federation.seed={seed}"]})
    return out


def _run_table_runs(p: dict, scenarios: list[str] | None) -> list[dict]:
    """Seed by seed (a finished seed is a complete replicate), and within a seed the costliest runs first, so
    that the two workers finish together."""
    order = {"tiers": 0, "label0.1": 1, "gen": 2, "domain1.0": 3, "task": 4}
    out = []
    for scen in scenarios or list(p["scenarios"]):
        spec = p["scenarios"][scen]
        for run, run_over in p["runs"][spec["kind"]].items():
            name = run_over[0].split("=", 1)[1]
            over = [*p["overrides"], f"federation.num_clients={spec['clients']}", *spec["overrides"]]
            if name == "fedamole":
                over += [*p["fedamole"], f"algorithm.num_experts={3 * spec['clients']}"]
            over += run_over
            for seed in p["seeds"]:
                out.append({"scenario": scen, "method": run, "seed": seed, "overrides": over + [f"federation.seed={seed}"]})
    return sorted(out, key=lambda r: (p["seeds"].index(r["seed"]), order.get(r["scenario"], 9),
                                      0 if r["method"].startswith("fedamole") or r["method"] == "fedit" else 1))
