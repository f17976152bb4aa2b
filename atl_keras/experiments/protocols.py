"""Protocols (dataset + evaluations), budgets (schedules) and what an experiment runs."""

from __future__ import annotations

from dataclasses import dataclass


from atl_keras.experiments.methods import (
    MAIN_METHODS,
    Method,
    ablation_methods,
    weak_label_methods,
    weak_label_proxy_methods,
)

#: Metrics in the report tables, in this order.
METRICS = ("recall_at_1", "recall_at_10", "recall_at_20", "map_at_r")
METRIC_TITLES = {"recall_at_1": "R@1", "recall_at_10": "R@10", "recall_at_20": "R@20", "map_at_r": "MAP@R"}
#: Fashion-MNIST classes held out of training (the last four class indices: 6-9).
FMNIST_UNSEEN = ("Shirt", "Sneaker", "Bag", "Ankle boot")
#: Seed of the Fashion-MNIST query/gallery split and of the street-style transform
#: (fixed across training seeds, so every seed is scored on the same queries).
EVAL_SEED = 2024
#: Top-k shown per query in the retrieval grids.
GRID_TOP = 5


@dataclass(frozen=True)
class Protocol:
    """A dataset + train settings and the evaluations scored on the trained model."""

    name: str
    title: str
    dataset: str
    evaluations: tuple[str, ...]
    unseen_classes: tuple[str, ...] = ()
    synthetic_variants: float = 0.0  # synthetic shop: share of designs listed several times
    street_views: int = 3  # synthetic shop: street photos (queries) per item

PROTOCOLS: dict[str, Protocol] = {
    "shop": Protocol("shop", "Synthetic shop, cross-domain (street -> catalog, unseen items)",
                     "synthetic-shop", ("shop",)),
    "fmnist": Protocol("fmnist", "Fashion-MNIST, 4 unseen classes", "fashion-mnist",
                       ("fmnist_clean", "fmnist_street"), FMNIST_UNSEEN),
    "variant_shop": Protocol(
        "variant_shop",
        "Synthetic shop with variant listings (40% of designs listed 2-3 times as re-listings or "
        "colour variants), street -> catalog, unseen designs, 6 street photos per item",
        "synthetic-shop", ("variant_shop",), synthetic_variants=0.4, street_views=6),
}
#: Evaluation setting -> title.
EVALUATIONS = {
    "shop": "Synthetic shop: street query -> catalog gallery (unseen items)",
    "fmnist_clean": "Fashion-MNIST unseen classes: clean query -> clean gallery",
    "fmnist_street": "Fashion-MNIST unseen classes: street-style query -> clean gallery",
    "variant_shop": "Variant shop: street query -> catalog gallery (unseen designs; variant listings in the gallery)",
    "catalog": "Your catalog: its test protocol (query -> gallery, or leave-one-out)",
}
#: Experiments `atl replicate` runs: the paper's claim, whether the weak label is used (the
#: 240-step Blocks A/B), and the pre-registered confirmatory Block C on trained models.
EXPERIMENTS = ("paper", "weak_label", "weak_label_confirmatory")
#: The confirmatory experiment's pre-registered seeds (docs/replication.md, Block C).
CONFIRMATORY_SEEDS = tuple(range(100, 110))


def catalog_protocol(spec: str) -> Protocol:
    """The protocol of a user's data set (``catalog:PATH`` or ``deepfashion-inshop:ROOT``)."""
    name = spec.partition(":")[0]
    if name not in ("catalog", "deepfashion-inshop") or not spec.partition(":")[2]:
        raise ValueError(f"--dataset must be catalog:PATH.csv|.jsonl or deepfashion-inshop:ROOT, got {spec!r}.")
    return Protocol("catalog", f"Your data: {spec}", spec, ("catalog",))


@dataclass(frozen=True)
class Schedule:
    """Budget shared by every method of a protocol."""

    epochs: int
    steps_per_epoch: int
    synthetic_items: int = 300
    shop_image_size: int = 32
    shop_pk: tuple[int, int] = (16, 4)
    fmnist_pk: tuple[int, int] = (6, 8)
    validation_size: int = 2000
    eval_limit: int | None = None  # Fashion-MNIST: at most this many query and gallery images
    learning_rate: float = 1e-3
    embedding_dim: int = 64
    #: Stop a run when validation R@1 has not improved for this many epochs and score the best
    #: epoch's weights (`epochs` x `steps_per_epoch` is then the step cap); None: train it all.
    early_stopping_patience: int | None = None

    @property
    def description(self) -> str:
        """One line for reports: the budget, and the stopping rule where there is one."""
        if self.early_stopping_patience is None:
            return f"{self.epochs} x {self.steps_per_epoch} steps"
        return (f"up to {self.epochs} x {self.steps_per_epoch} = {self.epochs * self.steps_per_epoch} steps, stopping "
                f"when validation R@1 has not improved for {self.early_stopping_patience} epochs of "
                f"{self.steps_per_epoch} steps (the best epoch's weights are scored)")

SCHEDULES: dict[str, Schedule] = {
    # CI-sized: a tiny shop, one short epoch; seconds per run.
    "quick": Schedule(epochs=1, steps_per_epoch=4, synthetic_items=80, shop_image_size=16,
                      shop_pk=(8, 2), fmnist_pk=(4, 4), validation_size=100, eval_limit=200),
    # What the full `--ablations` replication uses (fits 2 h on 2 cores; see docs/replication.md).
    "full": Schedule(epochs=3, steps_per_epoch=150),
    # About a third of the full budget (the medium run reported in results/ until a full run replaces it).
    "medium": Schedule(epochs=2, steps_per_epoch=80),
    # The weak-label experiment's budget (72 runs in one invocation; see docs/replication.md).
    "weak_label": Schedule(epochs=2, steps_per_epoch=120),
    # Trained models on the shop protocols: 12 x 150 = 1800 steps, after which doubling the steps
    # gave no fixed-margin R@1 gain on the variant shop (pilot: results/weak_label_pilot.md).
    "converged": Schedule(epochs=12, steps_per_epoch=150),
    # Users' catalogs (`atl replicate --dataset`): train each run until validation R@1 stops
    # improving (3 epochs of patience), at most 20 x 100 = 2000 steps.
    "early_stopping": Schedule(epochs=20, steps_per_epoch=100, early_stopping_patience=3),
}


@dataclass
class ReplicationConfig:
    """What to run. `seeds` are training seeds (the synthetic shop is also drawn from it)."""

    protocols: tuple[str, ...] = ("shop", "fmnist")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    schedule: str | Schedule = "full"
    ablations: bool = False
    ablation_protocols: tuple[str, ...] = ("shop",)
    text_encoder: str = "use-m3"
    work_dir: str = "runs/replication"
    text_cache_dir: str | None = None  # None: <ATL home>/text_encoders/cache (atl_keras.home)
    text_encoder_dir: str | None = None  # where use-m3 is built; None: <ATL home>/text_encoders
    grid_queries: int = 4
    max_k: int = 20
    reuse: bool = True  # reuse a run's record from work_dir when its settings are identical
    experiment: str = "paper"  # "paper" (baselines vs ATL) | "weak_label" | "weak_label_confirmatory"
    dataset: str | None = None  # a user's catalog:PATH / deepfashion-inshop:ROOT instead of protocols
    #: weak_label only: also train the proxy losses (`weak_label_proxy_methods`) on these seeds
    #: (a subset of `seeds`; an addition to the pre-registered design, reported separately).
    proxy_seeds: tuple[int, ...] = ()
    proxy_oracle: bool = False  # with proxy_seeds: also the adaptive proxy loss with oracle margins

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"Unknown experiment {self.experiment!r}; choose from {list(EXPERIMENTS)}.")
        if self.dataset is not None:
            catalog_protocol(self.dataset)  # validates the spec
            self.protocols = ("catalog",)
        self.protocols = tuple(self.protocols)
        unknown = [p for p in self.protocols if p not in PROTOCOLS and not (p == "catalog" and self.dataset)]
        if unknown or not self.protocols:
            raise ValueError(f"Unknown protocols {unknown or '(none)'}; choose from {list(PROTOCOLS)}.")
        self.ablation_protocols = tuple(p for p in self.ablation_protocols if p in self.protocols) or self.protocols[:1]
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}.")
        if isinstance(self.schedule, str):
            if self.schedule not in SCHEDULES:
                raise ValueError(f"Unknown schedule {self.schedule!r}; choose from {list(SCHEDULES)} or pass a Schedule.")
        if self.max_k < 1:
            raise ValueError(f"max_k must be >= 1, got {self.max_k}.")
        self.proxy_seeds = tuple(int(s) for s in self.proxy_seeds)
        if self.proxy_seeds and self.experiment != "weak_label":
            raise ValueError("proxy_seeds (the proxy losses beside ATL) belong to the weak_label experiment; "
                             "use experiment='weak_label' or drop them.")
        stray = sorted(set(self.proxy_seeds) - set(self.seeds))
        if stray or len(set(self.proxy_seeds)) != len(self.proxy_seeds):
            raise ValueError(f"proxy_seeds must be distinct and among seeds {self.seeds} (paired by seed), "
                             f"got {self.proxy_seeds}.")

    @property
    def schedule_obj(self) -> Schedule:
        return SCHEDULES[self.schedule] if isinstance(self.schedule, str) else self.schedule

    @property
    def schedule_name(self) -> str:
        return self.schedule if isinstance(self.schedule, str) else "custom"

    def protocol(self, name: str) -> Protocol:
        """The `Protocol` called `name` (``"catalog"``: the user's `dataset`)."""
        if name == "catalog" and self.dataset:
            return catalog_protocol(self.dataset)
        return PROTOCOLS[name]

    def methods(self, protocol: str) -> tuple[Method, ...]:
        """Methods run on `protocol`: the main three, plus the ablations where asked; for the
        weak-label experiment its margin-source conditions."""
        if self.experiment == "weak_label_confirmatory":  # Block C
            return weak_label_methods(oracle=protocol != "catalog", threshold=False, random=True)
        if self.experiment == "weak_label":
            methods = weak_label_methods(oracle=protocol != "catalog", threshold=protocol == "variant_shop",
                                         shuffled=protocol == "catalog", random=protocol == "catalog")
            if self.proxy_seeds:
                methods += weak_label_proxy_methods(oracle=self.proxy_oracle and protocol != "catalog")
            return methods
        if self.ablations and protocol in self.ablation_protocols:
            return MAIN_METHODS + ablation_methods()
        return MAIN_METHODS

    def method_seeds(self, method: Method) -> tuple[int, ...]:
        """The seeds `method` runs on: `proxy_seeds` for the weak-label proxy losses, else `seeds`."""
        return self.proxy_seeds if self.experiment == "weak_label" and method.is_proxy else self.seeds

    def plan(self) -> list[tuple[str, Method, int]]:
        """Every ``(protocol, method, seed)`` to run, in run order. The weak-label experiment
        runs seed-major (a stopped run still has complete paired seeds); the paper's method-major."""
        if self.experiment.startswith("weak_label"):
            return [(p, m, s) for p in self.protocols for s in self.seeds for m in self.methods(p)
                    if s in self.method_seeds(m)]
        return [(p, m, s) for p in self.protocols for m in self.methods(p) for s in self.method_seeds(m)]
