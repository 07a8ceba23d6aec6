"""The typed config of a GAD job: one frozen dataclass per role, defaults = the paper's settings.

Paper (arXiv 2511.10643): 256 prompts per step, n=8 samples at temperature 0.8, lr 1e-6 for
both models, grad clip 0.2, prompt 2048 / response 1536 tokens, 1 warmup epoch then 2 GAD
epochs, a checkpoint every 50 steps, KL (k3) to the reference at 0.001, 10 D-only steps.
"""

from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass, field

from gad_megatron.data.config import DataConfig
from gad_megatron.models.optim import OptimConfig
from gad_megatron.models.perf import PerfConfig
from gad_megatron.parallel.dist import ParallelLayout as ParallelConfig
from gad_megatron.tracking.config import TrackingConfig

ENGINES = ("hf", "vllm", "sglang")
ENGINE_PACKAGES = {"hf": "transformers", "vllm": "vllm", "sglang": "sglang"}
POLICY_LOSSES = ("gspo", "ppo")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "abs", "k2", "k3", "low_var_kl")
REWARD_SOURCES = ("discriminator", "task")
JUDGED_TASKS = ("", "styles")
"""Built-in tasks with an acceptance test (data/task_judge.py); '' for none."""
D_KINDS = ("scalar_head", "log_ratio")
"""How the discriminator scores a sequence (DiscriminatorConfig.kind)."""
NEGATIVE_KINDS = ("splice", "truncate", "swap", "mismatch")
"""Teacher-text negatives for D (data/negatives.py)."""


class Stage(str, enum.Enum):
    """Which stage a run trains; said in the config, never guessed from the data."""

    WARMUP = "warmup"  # D by BT every step; G by SFT on teacher answers after d_only_steps
    GAD = "gad"  # G by the policy loss with D's score as reward; D by BT every step
    SEQKD = "seqkd"  # the SFT-only baseline: no discriminator at all


def _paper_optim() -> OptimConfig:
    return OptimConfig(lr=1e-6, clip_grad=0.2)


@dataclass(frozen=True)
class ModelConfig:
    """The student's architecture and initial weights (the discriminator copies them)."""

    hf_path: str = ""
    """HF model directory of the initial student. Empty: the embedded default builds a tiny
    random model with the built-in tokenizer (CPU demo and tests)."""
    dtype: str = "float32"
    """Parameter dtype of the Megatron workers: float32, or bfloat16 on GPUs."""
    tiny_layers: int = 2
    """Embedded default only: transformer layers of the tiny student."""
    tiny_hidden: int = 64
    """Embedded default only: hidden size of the tiny student."""
    tiny_head_dim: int | None = None
    """Embedded default only: attention head size of the tiny student. None: 16, or 64 when
    rollout.engine is vllm (vLLM's CPU attention refuses head_dim 16; it takes 32, 64, 80,
    96, 112, 128, 160, 192, 224, 256 or 512)."""
    allow_pickle: bool = False
    """Accept an hf_path whose weights are only pickle files (`pytorch_model*.bin`). Off by
    default: unpickling can run any code the file holds. When on, the files are read once
    with `torch.load(weights_only=True)` (tensors only) into a safetensors copy in the run
    directory, which every worker and the rollout engine then load."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass(frozen=True)
class ActorConfig:
    """The student (generator): SFT in warmup/seqkd, policy loss + KL in gad."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=_paper_optim)
    perf: PerfConfig = field(default_factory=PerfConfig)
    """Memory/speed settings: sequence parallel, recompute, overlaps, fusions, TE refusal."""
    micro_batch_tokens: int = 8192
    """Token budget of one micro-batch (sequences are grouped until it is reached)."""
    policy_loss: str = "gspo"
    """'gspo' (sequence-level ratio) or 'ppo' (token-level ratio)."""
    clip_low: float = 3e-4
    """Lower clip range of the ratio (GSPO paper: 3e-4; PPO typically 0.2)."""
    clip_high: float = 4e-4
    """Upper clip range of the ratio (GSPO paper: 4e-4; PPO typically 0.2 or 0.28)."""
    dual_clip: float | None = None
    """PPO dual-clip constant (> 1) for negative advantages; None disables it."""
    loss_agg: str = "token-mean"
    """How token losses aggregate over the global batch."""
    kl_coef: float = 0.001
    """Weight of the KL loss to the frozen reference."""
    kl_kind: str = "low_var_kl"
    """KL estimator: k1, abs, k2, k3 / low_var_kl."""
    ppo_epochs: int = 1
    """Optimizer passes over each rollout batch (1: on-policy, ratio == 1 at the first pass)."""
    mini_batch_prompts: int | None = None
    """Prompts per optimizer step (verl's ppo_mini_batch_size): each batch of
    train.prompts_per_step prompts is split into mini-batches of this many prompts, all
    samples of a prompt in one, and each gets its own optimizer step, its loss normalised
    over that mini-batch. None: the whole batch, one step. That is the paper's setting: its
    released script (microsoft/LMOps gad/scripts/train/*-adversarial-*.sh) sets
    ppo_mini_batch_size=256 = train_batch_size. Applies to SFT (warmup, seqkd) and to the
    policy loss (gad); must divide train.prompts_per_step."""

    def __post_init__(self) -> None:
        _one_of("policy_loss", self.policy_loss, POLICY_LOSSES)
        _one_of("loss_agg", self.loss_agg, AGG_MODES)
        _one_of("kl_kind", self.kl_kind, KL_KINDS)
        if self.micro_batch_tokens < 1 or self.ppo_epochs < 1:
            raise ValueError("micro_batch_tokens and ppo_epochs must be >= 1")
        if self.clip_low < 0 or self.clip_high < 0 or self.kl_coef < 0:
            raise ValueError("clip_low, clip_high and kl_coef must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The discriminator: Bradley-Terry on (teacher, student sample) pairs, every step."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=_paper_optim)
    perf: PerfConfig = field(default_factory=PerfConfig)
    """Memory/speed settings (see ActorConfig.perf)."""
    kind: str = "scalar_head"
    """'scalar_head' (the paper): the student's backbone with a scalar head, read at the last
    valid token. 'log_ratio': D keeps the student's LM head and scores a sequence by
    log_ratio_beta * sum over its response tokens of log pi_D - log pi_0, pi_0 a frozen copy
    of D's starting weights held by the D rank (DPO's implicit reward, the discriminator of
    SPIN): a BT step then raises D's likelihood of the teacher's tokens and lowers that of
    the student's, token by token, where a scalar head must learn from one number per
    answer. gad stage only, from the student (init_from_actor=true)."""
    log_ratio_beta: float = 1.0
    """kind=log_ratio: the scale of the log-ratio score (DPO's beta)."""
    micro_batch_tokens: int = 8192
    """Token budget of one micro-batch."""
    mini_batch_prompts: int | None = None
    """Prompts per BT optimizer step (their teacher answer and samples stay together); None:
    the whole batch, one step. The paper's script leaves verl's critic.ppo_mini_batch_size at
    the actor's, 256 = the batch, so one step. Must divide train.prompts_per_step."""
    score_eos: bool = True
    """Whether a trailing EOS is part of the scored sequence. Applied to teacher answers and
    student samples alike, so identical answers always get identical scores."""
    head_init_std: float = 1e-3
    """Std of the fresh scalar head's weights."""
    bt_temperature: float = 1.0
    """Temperature of the BT sigmoid (1.0: the paper's loss)."""
    bt_margin: float = 0.0
    """Margin subtracted from the teacher-student gap (0.0: the paper's loss)."""
    score_reg_weight: float = 0.0
    """Weight of the |score| > threshold penalty (0: off), against an over-confident D."""
    score_reg_threshold: float = 5.0
    """Scores beyond this magnitude are penalised when score_reg_weight > 0."""
    normalize_scores: bool = False
    """Batch-normalise each micro-batch's teacher and sample scores together (one shared
    affine map, so every pair keeps its sign) before the BT loss: D's scale is fixed at ~1
    and cannot saturate the sigmoid. False: the paper's loss."""
    normalize_eps: float = 1e-6
    """Added to the variance when normalize_scores is on (a constant batch maps to 0)."""
    adaptive_temperature: bool = False
    """Replace bt_temperature by clamp(bt_temperature + adaptive_temp_scale * mean|t - s|,
    adaptive_temp_min, adaptive_temp_max) each micro-batch: a wide gap softens the sigmoid.
    Computed after normalize_scores when both are on. False: the fixed bt_temperature."""
    adaptive_temp_scale: float = 0.5
    """Temperature added per unit of mean |teacher - sample| score gap (>= 0)."""
    adaptive_temp_min: float = 1.0
    """Lower clamp of the adaptive temperature (> 0)."""
    adaptive_temp_max: float = 8.0
    """Upper clamp of the adaptive temperature (>= adaptive_temp_min)."""
    update_in_gad: bool = True
    """gad stage: train D by BT every step (the paper). False freezes D at the warmup's
    weights (the paper's off-policy-discriminator ablation, which gets reward-hacked)."""
    updates_per_step: int = 1
    """BT passes over each step's pairs (each pass takes its mini-batches' optimizer
    steps), in warmup and gad: a D that learns faster than G moves, at no extra rollout."""
    negatives: tuple[str, ...] = ()
    """Extra negatives for the BT update made from teacher text alone (data/negatives.py):
    any of 'splice' (head of one teacher answer to the prompt, tail of another), 'truncate',
    'swap' (two spans exchanged), 'mismatch' (the teacher's answer to another prompt of the
    batch). Each pairs with the prompt's teacher answer like a student sample; they enter
    D's update only, never G's reward or the d/ metrics of the step's samples. (): none,
    the paper's update."""
    negatives_per_kind: int = 1
    """Negatives of each kind per prompt and step."""
    tiny_layers: int | None = None
    """Embedded default only: the discriminator's own number of transformer layers (None:
    the student's, model.tiny_layers). Black-box distillation allows a D larger than the
    student (the paper's equal size is a choice, not a rule); a D of its own shape starts
    from random weights of that shape."""
    tiny_hidden: int | None = None
    """Embedded default only: the discriminator's own hidden size (None: model.tiny_hidden)."""
    init_from_actor: bool = False
    """gad stage: D's backbone starts from the student's weights in train.init_from (the
    warmed-up student: the paper's D is the student's own backbone) with a fresh head,
    instead of from the warmup's D. Pair it with train.gad_d_only_steps, so that the fresh
    head is trained before its scores become rewards."""

    def __post_init__(self) -> None:
        if self.bt_temperature <= 0:
            raise ValueError(f"bt_temperature must be > 0, got {self.bt_temperature}")
        if self.micro_batch_tokens < 1 or self.head_init_std <= 0:
            raise ValueError("micro_batch_tokens must be >= 1 and head_init_std > 0")
        if self.normalize_eps <= 0 or self.adaptive_temp_scale < 0:
            raise ValueError("normalize_eps must be > 0 and adaptive_temp_scale >= 0")
        _one_of("kind", self.kind, D_KINDS)
        if self.log_ratio_beta <= 0:
            raise ValueError(f"log_ratio_beta must be > 0, got {self.log_ratio_beta}")
        unknown = [k for k in self.negatives if k not in NEGATIVE_KINDS]
        if unknown or len(set(self.negatives)) != len(self.negatives):
            raise ValueError(f"negatives must be distinct kinds from {list(NEGATIVE_KINDS)}, "
                             f"got {list(self.negatives)}")
        if self.updates_per_step < 1 or self.negatives_per_kind < 1:
            raise ValueError("updates_per_step and negatives_per_kind must be >= 1")
        if not 0 < self.adaptive_temp_min <= self.adaptive_temp_max:
            raise ValueError(f"need 0 < adaptive_temp_min <= adaptive_temp_max, got "
                             f"{self.adaptive_temp_min} and {self.adaptive_temp_max}")


@dataclass(frozen=True)
class ReferenceConfig:
    """The frozen reference policy, for the KL term of the gad stage."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    """Memory/speed settings (forward only: the optimizer overlaps do not apply)."""
    micro_batch_tokens: int = 8192
    """Token budget of one micro-batch."""


@dataclass(frozen=True)
class RolloutConfig:
    """The engine that samples the student's answers."""

    engine: str = "hf"
    """'hf' (transformers generate: CPU and small GPUs), 'vllm' or 'sglang'."""
    tp: int = 1
    """The engine's own tensor-parallel size (vllm/sglang)."""
    n: int = 8
    """Samples per prompt."""
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 1536
    bucket_mb: int = 512
    """Weight-sync bucket size: the peak extra memory of a sync is one bucket."""
    gpu_memory_utilization: float = 0.5
    """vllm/sglang: share of GPU memory the engine may take (passed to the engine)."""
    sleep_when_idle: bool = False
    """Release the engine's memory between rollouts also when disaggregated (colocated runs
    always do: the trainer's models need the devices between rollouts)."""
    deterministic: bool = True
    """sglang: turn on deterministic inference; without it SGLang ignores the per-sample
    sampling seeds, so a seeded rollout would not be reproducible (costs some speed)."""
    max_staleness: int = 0
    """0: on-policy, each step samples from the weights it trains. 1: one-step off-policy
    (NeMo-RL's async GRPO at age 1): step t+1's samples are generated while step t trains,
    from the weights before step t's update, so they are one policy version old (logged as
    rollout/staleness; the policy loss's ratio is to the actor's log-probs at the time of the
    update). Needs the engine on devices of its own (run.colocate=false) to overlap; the
    inline backend keeps the semantics without the overlap. Only 0 and 1."""

    def __post_init__(self) -> None:
        _one_of("engine", self.engine, ENGINES)
        if self.max_staleness not in (0, 1):
            raise ValueError(f"max_staleness must be 0 (on-policy) or 1 (one-step "
                             f"off-policy), got {self.max_staleness}")
        if self.n < 1 or self.tp < 1 or self.max_new_tokens < 1 or self.bucket_mb < 1:
            raise ValueError("n, tp, max_new_tokens and bucket_mb must be >= 1")
        if not 0 < self.temperature or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")


@dataclass(frozen=True)
class TrainConfig:
    """What the controller runs."""

    stage: Stage = Stage.WARMUP
    """warmup, gad or seqkd."""
    steps: int = 0
    """Steps to run; 0 means `epochs` full passes over the training data."""
    epochs: int = 1
    """Epochs when steps == 0 (paper: 1 warmup epoch, then 2 gad epochs)."""
    prompts_per_step: int = 256
    """Prompts per global batch."""
    d_only_steps: int = 10
    """Warmup: steps at the start in which only D is trained."""
    init_from: str = ""
    """A run directory (or checkpoint) to start from. Required by gad (the warmup run: both
    models start there); optional for seqkd, whose student then starts from that checkpoint's
    actor (SeqKD continued from warmup: the equal-step baseline for gad). Not used by warmup,
    which starts from model.hf_path."""
    save_every: int = 50
    """Checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 3
    """Checkpoints kept."""
    resume: bool = True
    """Continue from the run directory's latest complete checkpoint when there is one. A run
    directory whose checkpoints exist but whose `latest` one is missing or incomplete is
    refused, never restarted from step 0."""
    resume_fallback: bool = False
    """When `latest` is missing or incomplete, resume from the newest complete checkpoint
    instead of refusing (off by default: the user decides which state to continue)."""
    overwrite: bool = False
    """With resume=false: discard the run directory's existing checkpoints and start over.
    Without it, resume=false on a run that has checkpoints is refused."""
    max_skipped_steps: int = 3
    """A role's update is skipped (weights unchanged, counted in */skipped_steps) when a loss
    or gradient is not finite; after this many consecutive skips the run stops, naming the
    role and the quantity. 1 stops at the first."""
    gad_d_only_steps: int = 0
    """gad: steps at the start in which only D is trained (the step's samples are drawn and
    scored, D takes its BT update, G is not updated); for a D that starts fresh
    (discriminator.init_from_actor). 0: G learns from the first step (the paper)."""
    frozen_d_monitor: bool = False
    """gad: also score each step's samples with a frozen copy of the starting discriminator
    (for measurement only: a reward that rises under a fixed D means G is learning)."""
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.steps < 0 or self.epochs < 1 or self.prompts_per_step < 1:
            raise ValueError("steps >= 0, epochs >= 1 and prompts_per_step >= 1 are required")
        if self.d_only_steps < 0 or self.save_every < 0 or self.keep_last < 1:
            raise ValueError("d_only_steps >= 0, save_every >= 0 and keep_last >= 1 are required")
        if self.max_skipped_steps < 1:
            raise ValueError(f"max_skipped_steps must be >= 1, got {self.max_skipped_steps}")
        if self.overwrite and self.resume:
            raise ValueError("overwrite=true discards checkpoints and needs resume=false")


@dataclass(frozen=True)
class RewardConfig:
    """Where the gad stage's reward comes from, and the task test that measures D."""

    source: str = "discriminator"
    """'discriminator': D's score before its update this step (GAD). 'task': the verdict of
    reward.task's acceptance test, 1 accepted / 0 rejected: an upper bound for the RL side
    (same GRPO update, a reward that is right), not distillation, since a black-box teacher
    has no such test. D is still scored and updated, for its figures."""
    task: str = ""
    """A built-in task with an acceptance test ('styles'), or '' for none. When set, every
    warmup and gad step judges its training rollouts with it and logs task/accept_rate,
    d/oracle_auc (D's AUC for accepted vs rejected samples) and d/teacher_vs_accepted_gap;
    measurement only unless source='task'."""

    def __post_init__(self) -> None:
        _one_of("source", self.source, REWARD_SOURCES)
        _one_of("task", self.task, JUDGED_TASKS)
        if self.source == "task" and not self.task:
            raise ValueError("reward.source=task needs reward.task (e.g. styles): the "
                             "acceptance test that gives the reward")


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how its processes are placed."""

    out_dir: str = "runs/default"
    """Run directory: checkpoints, logs, the resolved config."""
    ray_address: str = ""
    """Ray cluster to join ('' starts a local one on 127.0.0.1)."""
    num_cpus: int = 0
    """CPU slots of a local Ray (0: Ray's own count)."""
    use_gpus: bool = False
    """Place one GPU per rank (True on GPU clusters)."""
    colocate: bool = False
    """Actor, discriminator and reference share the same devices (else disaggregated)."""
    offload_when_colocated: bool = True
    """Colocated runs: each Megatron role holds its weights, gradients and optimizer state
    on the devices only during its own calls, and in host memory between them (as verl and
    slime offload). Off: every role stays resident (only for models far smaller than the
    devices)."""
    worker_timeout_s: float = 600.0
    """A remote call not answered within this time fails the job, naming role and rank."""


@dataclass(frozen=True)
class GADConfig:
    """A whole job."""

    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        for role in ("actor", "discriminator"):
            k = getattr(self, role).mini_batch_prompts
            if k is not None and self.train.prompts_per_step % k:
                raise ValueError(f"{role}.mini_batch_prompts={k} must divide "
                                 f"train.prompts_per_step={self.train.prompts_per_step}")
            dp = getattr(self, role).parallel.dp
            if k is not None and k < dp:  # a prompt group is never split across replicas
                raise ValueError(f"{role}.mini_batch_prompts={k} gives some of the "
                                 f"{role}.parallel.dp={dp} replicas no prompt; use >= {dp}")
        if self.rollout.max_staleness and self.run.colocate:
            raise ValueError("rollout.max_staleness=1 overlaps generation with training, but "
                             "run.colocate=true puts the engine on the trainer's devices "
                             "(it sleeps while they train); set run.colocate=false")
        d = self.discriminator
        if (d.tiny_layers or d.tiny_hidden) and self.model.hf_path:
            raise ValueError("discriminator.tiny_layers / tiny_hidden shape the embedded "
                             "default's D; with model.hf_path the D is the model's backbone")
        if d.init_from_actor and (d.tiny_layers not in (None, self.model.tiny_layers)
                                  or d.tiny_hidden not in (None, self.model.tiny_hidden)):
            raise ValueError("discriminator.init_from_actor loads the student's weights, "
                             "which do not fit a D of another shape (discriminator.tiny_*)")
        if d.kind == "log_ratio" and (self.train.stage != Stage.GAD or not d.init_from_actor
                                      or self.train.frozen_d_monitor):
            raise ValueError("discriminator.kind=log_ratio is a gad-stage D made from the "
                             "student: it needs train.stage=gad and "
                             "discriminator.init_from_actor=true, and no frozen_d_monitor "
                             "(that monitor is the warmup's scalar-head D)")
        if self.train.gad_d_only_steps and not self.discriminator.update_in_gad:
            raise ValueError("train.gad_d_only_steps trains D alone, but "
                             "discriminator.update_in_gad=false freezes it")
        if self.train.stage == Stage.GAD and self.rollout.n < 2:
            raise ValueError(f"rollout.n must be >= 2 in the gad stage (GRPO normalises over "
                             f"each prompt's samples), got {self.rollout.n}")
        package = ENGINE_PACKAGES[self.rollout.engine]
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"rollout.engine={self.rollout.engine!r} needs the '{package}' "
                             f"package, which is not installed (on CPU: make setup-vllm; on "
                             f"GPU machines: make setup-gpu ENGINE={package})")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
