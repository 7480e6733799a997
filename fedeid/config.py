"""The one configuration object of fedeid.

The CLI, the training loop, the Flower ClientApp and ServerApp all read the same
:class:`Config`. It is plain data (nested dataclasses), serialisable to a dict for checkpoints
and reports, and overridable from flat dotted keys (``"fed.rounds"``), which is how Flower's
run config (``[tool.flwr.app.config]``, ``--run-config``) and ``--set`` on the CLI reach it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FINDINGS: tuple[str, ...] = ("nodule", "effusion", "cardiomegaly", "opacity")
# The de-identification methods a checkpoint can hold: method A (identity blocking + compensation)
# and method B (identity replacement with synthetic identities, fedeid.deid.replace).
METHODS: tuple[str, ...] = ("blocking", "replace")


@dataclass
class DataConfig:
    """Where images come from and how they are split into sites and held-out patients."""

    source: str = "synthetic"  # "synthetic", or a CSV / ChestX-ray14 folder (see fedeid.data.loaders)
    image_size: int = 128
    n_sites: int = 3
    patients_per_site: int = 40
    images_per_patient: int = 4
    test_patients: int = 30  # held-out patients shared by every evaluation
    seed: int = 0
    findings: tuple[str, ...] = ()  # empty = the synthetic benchmark's FINDINGS; set by real-data loaders


@dataclass
class ModelConfig:
    """Architecture of the networks; stored in every checkpoint so it rebuilds itself."""

    encoder: str = "efficientnet-lite0"  # or "checkpoint:/path/to/model.pt" (fedeid.models.encoder)
    medical_channels: int = 32  # decoupled medical code (reaches the decoder)
    identity_channels: int = 16  # identity code (discarded at inference)
    decouple: bool = True  # False = the ablation "fedeid without the MDL decoupler"
    decoder_width: int = 16
    patch_size: int = 16  # blocking granularity, in pixels at image_size
    reid_dim: int = 64  # ReID embedding size
    reid_size: int = 64  # ReID networks see images resized to this (cheap, keeps anatomy)
    visible_sigma: float = 6.0  # visible low-pass sigma at level 1, px at image_size, x sqrt(level) (DeIdModel.visible_sigma)
    feather: float = 2.0  # blend width at the block border (px at image_size)
    matchability_weight: float = 1.0  # cohort patch matchability beside ReID saliency when ranking patches
    # Gumbel noise on that ranking per release (fedeid.deid.blocking.gumbel_perturb), in its units
    # (saliency ranks in [0, 1] plus the weighted matchability): 0 = a deterministic mask, whose
    # layout alone links a patient's images
    mask_temperature: float = 3.0


@dataclass
class TrainConfig:
    """Optimisation and the weights of method A's losses."""

    device: str = "auto"
    seed: int = 0
    batch_size: int = 16
    lr: float = 2e-3
    reid_epochs: int = 20
    deid_epochs: int = 20  # 10 left the finding rendering undertrained (side by side: level-0.8 AUC 0.72 -> 0.81)
    level_min: float = 0.0  # blocking levels sampled during decoder training
    level_max: float = 1.0
    w_rec: float = 1.0  # reconstruction on visible regions
    w_fill: float = 1.0  # reconstruction of blocked regions at low resolution (structure, not detail)
    w_sem: float = 1.0  # MFM features of output ~ medical code of input
    w_med: float = 1.0  # medical-task term on the medical code and on the output
    w_id: float = 0.5  # identity suppression on the output (ReID embedding away from input's)
    w_rate: float = 0.05  # MDL rate: KL of the medical code to its prior, nats per code element
    w_indep: float = 1.0  # cross-covariance between medical and identity codes
    w_adv: float = 0.5  # identity adversary on the medical code (gradient reversal)
    w_idcode: float = 1.0  # identity code must carry the ReID signal
    w_task: float = 3.0  # medical-task preservation: the site's finding head on the output


@dataclass
class FederatedConfig:
    """Flower run settings (server/ and client/ read these)."""

    # What the federation trains (fedeid.federated.methods): "blocking" (method A: decoupler +
    # decoder travel) or "replace" (method B: encoder heads + generator travel; each site's
    # identity prior stays at the site). Server and sites read it from the one Config.
    method: str = "blocking"
    # 6 rounds x 3 local epochs left the sites' networks short of rendering findings from level 0.6 up;
    # 12 (measured on the quick main job) raised the finding AUC at every level from 0.4 and lowered
    # the worst-case P@1 there, for twice the simulation time
    rounds: int = 12
    local_epochs: int = 3
    strategy: str = "fedavg"  # or "fedprox"
    proximal_mu: float = 0.01
    fraction_train: float = 1.0
    min_clients: int = 2
    num_supernodes: int = 3
    # How replies are combined (fedeid.federated.robust): "mean" (FedAvg), "trimmed-mean",
    # "median", "krum", "multi-krum" or "bulyan". Every rule sees only replies that passed the
    # value checks below, and composes with central DP (noise scaled to the rule's sensitivity).
    aggregation: str = "mean"
    trim_fraction: float = 0.2  # trimmed-mean: fraction cut from each tail, per coordinate
    byzantine: int = 1  # krum / multi-krum / bulyan: sites assumed hostile per round
    # Value checks on every reply (fedeid.federated.screen): an update whose L2 norm exceeds
    # max_update_norm (0: no absolute bound) or update_norm_factor x the round's median update
    # norm (0: off) is rejected, with or without DP.
    max_update_norm: float = 0.0
    update_norm_factor: float = 10.0
    # "capped": num-examples weights, each claim capped at max_weight_ratio x the round's median
    # claim and at max_examples (0: no absolute cap); "equal": every site weighs the same;
    # "claimed": trust the sites' claims (plain FedAvg; only among sites you trust).
    weighting: str = "capped"
    max_weight_ratio: float = 3.0
    max_examples: int = 0
    secure_aggregation: bool = False  # SecAgg+: the server sees only the sum of site-clipped updates


@dataclass
class PrivacyConfig:
    """Differential privacy for the federated training; off by default."""

    mode: str = "none"  # "none", "central" (server clipping + Gaussian noise) or "local" (Opacus DP-SGD)
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0  # central: per-client update norm; local: per-sample gradient norm
    delta: float = 1e-5


@dataclass
class EvalConfig:
    """What the evaluation measures."""

    levels: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    baselines: tuple[str, ...] = ("blur", "pixelate", "dppix", "block", "no_decoupler")
    attacker_epochs: int = 12
    adaptive_epochs: int = 4
    classifier_epochs: int = 12
    classifier_size: int = 64  # the finding classifier sees images resized to this
    # the attacker suite (fedeid.eval.attackers); privacy figures are the worst case over it
    attackers: tuple[str, ...] = ("learned", "adaptive", "keypoint", "patch", "foundation", "foundation_tuned",
                                  "model_holder", "fusion")
    attacker_size: int = 64  # the learned attacker sees images at this size (128: 4x the cost of every adaptive retraining)
    patch_shift: int = 4  # patch attacker: pixels of shift searched (acquisitions move ~2 px, rotate ~3 deg)
    patch_top_k: int = 8  # patch attacker: mean of this many best-matching patches (of 64 at 128 px)


@dataclass
class ReplaceConfig:
    """Method B (identity replacement with synthetic identities, counterfactuals): sizes and loss weights.

    The identity vector lives in the site ReID network's embedding space (``model.reid_dim``
    wide, unit norm), so the margin at which the ReID network would match two images is also the
    margin a synthetic identity must keep from every real patient.
    """

    medical_dim: int = 16  # medical vector: one logit per finding, then this many free dimensions
    other_dim: int = 8  # residual vector (acquisition: pose, exposure); kept small so it cannot hold anatomy
    width: int = 8  # generator channels at full resolution (x2 per halving, capped at 8x); encoder 2x
    epochs: int = 20
    # L1 reconstruction of the image from its own three vectors. At 1 the swap and judge terms
    # outweighed it and the generator drew one blob for every patient (training L1 0.20); at 10
    # it draws a chest per patient (L1 0.08-0.10, held-out PSNR 17; reconstruction alone: 0.06)
    w_rec: float = 10.0
    w_swap: float = 1.0  # kept vectors come back after a swap (re-encode the generated image)
    w_id: float = 1.0  # identity metric loss: CosFace of the identity vector against patient ids
    # finding loss on the medical vector and on the swapped image's re-encoding: at 3 (against 1,
    # both with w_rec 10; one probe each, quick preset) the generator renders the findings it is
    # given: counterfactual set-to-1 flip rates 1-36 % -> 47-100 %, strength-1 AUC 0.54 -> 0.70
    w_med: float = 3.0
    w_judge: float = 1.0  # the site ReID network sees the swapped identity and the findings in the output
    prior_components: int = 8  # Gaussian mixture components of the identity prior (fewer if few patients)
    prior_fpr: float = 1e-3  # margin = the cosine that different patients exceed at this rate
    prior_bank: int = 2048  # accepted synthetic identities stored with the model


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FederatedConfig = field(default_factory=FederatedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    replace: ReplaceConfig = field(default_factory=ReplaceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error (a typo must not pass)."""
        cfg = cls()
        for section, values in d.items():
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        return cfg

    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` (hyphens allowed for underscores), coercing to the field's type."""
        section_name, _, key = dotted.replace("-", "_").partition(".")
        section = getattr(self, section_name, None)
        if section is None or not dataclasses.is_dataclass(section) or not key:
            raise KeyError(f"unknown config section in {dotted!r}")
        fields = {f.name: f for f in dataclasses.fields(section)}
        if key not in fields:
            raise KeyError(f"unknown config key {dotted!r}; known: {sorted(fields)}")
        setattr(section, key, _coerce(getattr(section, key), value, dotted))

    def override(self, flat: dict[str, Any]) -> Config:
        """Apply flat dotted overrides (Flower run config, CLI ``--set``); keys of other apps ignored."""
        for k, v in flat.items():
            if k.split(".", 1)[0].replace("-", "_") in {f.name for f in dataclasses.fields(self)}:
                self.set(k, v)
        return self

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _coerce(current: Any, value: Any, name: str) -> Any:
    if isinstance(current, bool):
        if isinstance(value, str):
            return value.lower() in {"1", "true", "yes", "on"}
        return bool(value)
    if isinstance(current, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        kind = type(current[0]) if current else str
        return tuple(kind(str(x).strip()) if kind is not str else str(x).strip() for x in items if str(x).strip())
    try:
        return type(current)(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config {name}: cannot read {value!r} as {type(current).__name__}") from exc


def preset(name: str) -> Config:
    """Named starting points.

    * ``quick`` — 128 px, three sites, small epochs: end to end on 2 CPU cores in minutes.
    * ``full`` — more patients and epochs: the README's headline figures.
    * ``test`` — 64 px, tiny: for the test suite.
    """
    cfg = Config()
    if name == "quick":
        return cfg
    if name == "full":
        cfg.data.patients_per_site = 100
        cfg.data.images_per_patient = 5
        cfg.data.test_patients = 60
        cfg.train.reid_epochs = 25
        cfg.train.deid_epochs = 25
        cfg.eval.attacker_epochs = 25
        cfg.eval.classifier_epochs = 25
        cfg.eval.adaptive_epochs = 8
        cfg.eval.levels = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
        return cfg
    if name == "test":
        cfg.data.image_size = 64
        cfg.data.n_sites = 2
        cfg.data.patients_per_site = 8
        cfg.data.images_per_patient = 3
        cfg.data.test_patients = 6
        cfg.model.patch_size = 8
        cfg.model.reid_size = 32
        cfg.model.visible_sigma = 3.0
        cfg.model.feather = 1.0
        cfg.model.decoder_width = 8
        cfg.model.medical_channels = 8
        cfg.model.identity_channels = 4
        cfg.model.reid_dim = 16
        cfg.train.batch_size = 8
        cfg.train.reid_epochs = 1
        cfg.train.deid_epochs = 1
        cfg.fed.rounds = 2
        cfg.fed.local_epochs = 1
        cfg.fed.num_supernodes = 2
        cfg.eval.levels = (0.0, 0.5, 1.0)
        cfg.eval.attacker_epochs = 1
        cfg.eval.adaptive_epochs = 1
        cfg.eval.classifier_epochs = 1
        cfg.eval.attacker_size = 32
        cfg.eval.patch_shift = 2
        cfg.replace.medical_dim = 4
        cfg.replace.other_dim = 4
        cfg.replace.width = 4
        cfg.replace.epochs = 1
        cfg.replace.prior_components = 2
        cfg.replace.prior_bank = 256
        return cfg
    raise ValueError(f"unknown preset {name!r}; choose quick, full or test")
