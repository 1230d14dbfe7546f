"""Range and consistency checks of a built RunConfig: what no type hint can express (positive counts, shares
in (0, 1], settings only one method, task or privacy mode understands). :func:`fedcustom.config.build_config`
runs :func:`validate` on every config it builds."""

from __future__ import annotations

from fedcustom.config import RunConfig, parse_partition, shown
from fedcustom.errors import ConfigError


def _positive(where: str, value: float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{where}: expected a number > 0, got {value}")


def validate(cfg: RunConfig) -> None:
    """Range checks that no type hint can express."""
    parse_partition(cfg.data.partition)
    fed, train, data = cfg.federation, cfg.train, cfg.data
    for where, value in [
        ("federation.clients (--clients)", fed.clients), ("federation.rounds (--rounds)", fed.rounds),
        ("train.batch_size", train.batch_size),
        ("method.num_virtual_tokens", cfg.method.num_virtual_tokens),
        ("method.lora_r", cfg.method.lora_r), ("method.public_size (--public-size)", cfg.method.public_size),
        ("method.distill_epochs", cfg.method.distill_epochs),
        ("federation.min_available (--min-available)", fed.min_available),
        ("federation.round_timeout (--round-timeout)", fed.round_timeout),
    ]:
        _positive(where, value, allow_none=False)
    if not 0.0 <= fed.client_eval_fraction < 1.0:
        raise ConfigError(f"federation.client_eval_fraction (--client-eval-fraction): {fed.client_eval_fraction!r} "
                          f"is not in [0, 1): the share of each client's rows held out for its own test")
    if fed.client_profiles is not None:
        if fed.runtime != "embedded":
            raise ConfigError(f"--client-profiles with --runtime {fed.runtime}: device profiles simulate clients in "
                              f"this process; a real deployment's devices take the time they take")
        from fedcustom.profiles import load_profiles

        load_profiles(fed.client_profiles)
    from fedcustom.tasks import get_task

    _positive("model.max_length (--max-length)", cfg.model.max_length,
              allow_none=get_task(cfg.model.task).default_max_length is None)
    _positive("method.kd_temperature (--kd-temperature)", cfg.method.kd_temperature)
    for where, value in [
        ("federation.local_steps", fed.local_steps), ("federation.clients_per_round", fed.clients_per_round),
        ("federation.local_epochs (--local-epochs)", fed.local_epochs),
        ("train.lr", train.lr), ("data.max_train_examples", data.max_train_examples),
        ("data.max_eval_examples", data.max_eval_examples), ("method.topk (--topk)", cfg.method.topk),
    ]:
        _positive(where, value)
    if not 0 < fed.fraction <= 1:
        raise ConfigError(f"federation.fraction (--fraction): expected 0 < fraction <= 1, got {fed.fraction}")
    if fed.clients_per_round is not None and fed.clients_per_round > fed.clients:
        raise ConfigError(
            f"federation.clients_per_round: {fed.clients_per_round} exceeds the {fed.clients} clients"
        )
    from fedcustom.codecs.chain import parse_chain  # the chain grammar lives with the codecs

    parse_chain(cfg.codec.up, "codec.up (--codec)")
    parse_chain(cfg.codec.down or cfg.codec.up, "codec.down (--codec-down)")
    validate_trust(cfg)
    validate_task(cfg)
    validate_scale(cfg)
    validate_convergence(cfg)
    from fedcustom.tracking import TRACKERS, check_installed

    unknown = [name for name in cfg.output.trackers if name not in (*TRACKERS, "none")]
    if unknown:
        raise ConfigError(f"output.trackers (--tracker) {', '.join(map(shown, unknown))}: expected "
                          f"{', '.join(TRACKERS)} or none")
    check_installed(cfg.output.trackers)
    if data.columns is not None:
        names = [c.strip() for c in data.columns.split(",")]
        if not all(names) or len(set(names)) != len(names):
            raise ConfigError(f"data.columns (--columns) {data.columns!r}: expected distinct, non-empty column names "
                              f"separated by commas, e.g. label,text")
    if not cfg.output.dir.strip():
        raise ConfigError("output.dir (--output): expected a folder path, got an empty one")
    if not 0 < data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction: expected 0 < fraction < 1, got {data.eval_fraction}")
    validate_training(cfg)


SEED_RANGE = (0, 2**32 - 1)  # numpy's and scikit-learn's random_state range


def validate_training(cfg: RunConfig) -> None:
    """Seeds, optimizer and adapter hyperparameters that the libraries would reject mid-run (or, for a client's
    optimizer, in every client of every round, leaving the run to finish with nothing trained)."""
    fed, train, method = cfg.federation, cfg.train, cfg.method
    for where, seed in [("train.seed (--seed)", train.seed), ("data.split_seed (--split-seed)", cfg.data.split_seed)]:
        if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise ConfigError(f"{where}: expected an integer in [0, 2**32 - 1], got {seed}")
    if train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay (--weight-decay): expected >= 0, got {train.weight_decay}")
    from fedcustom.trust import clients_per_round

    sampled = clients_per_round(cfg)
    if fed.min_available > sampled:
        raise ConfigError(f"federation.min_available (--min-available): {fed.min_available} exceeds the {sampled} "
                          f"clients sampled per round (--clients {fed.clients}, --fraction / --clients-per-round), "
                          "so no round could ever change the global model")
    if train.gradient_checkpointing and method.name == "prefix":
        raise ConfigError("--gradient-checkpointing with --method prefix: a checkpointed layer drops the attention "
                          "cache in training, and PEFT's prefix travels in that cache, so the prefix would be left out "
                          "of every training step (or the padded attention mask would not fit); leave "
                          "--gradient-checkpointing off, or use lora or prompt tuning")
    if not 0 <= method.lora_dropout < 1:
        raise ConfigError(f"method.lora_dropout: expected 0 <= dropout < 1, got {method.lora_dropout}")
    _positive("method.lora_alpha (--lora-alpha)", method.lora_alpha, allow_none=False)
    _positive("method.projection_hidden", method.projection_hidden)
    if fed.target_accuracy is not None and not 0 <= fed.target_accuracy <= 1:
        raise ConfigError(f"federation.target_accuracy (--target-accuracy): the headline metric is a share in [0, 1] "
                          f"(for 85% write 0.85), got {fed.target_accuracy}")


def validate_trust(cfg: RunConfig) -> None:
    """Privacy, adversary and fault settings: ranges and combinations that cannot work together."""
    fed, priv, adv = cfg.federation, cfg.privacy, cfg.adversary
    from fedcustom.strategies import get_strategy  # the strategy grammar lives with the strategies

    get_strategy(fed.strategy)
    _positive("federation.max_update_mb (--max-update-mb)", fed.max_update_mb)
    for where, value in [("federation.client_failure_rate (--client-failure-rate)", fed.client_failure_rate),
                         ("adversary.fraction (--attack-fraction)", adv.fraction)]:
        if not 0 <= value < 1:
            raise ConfigError(f"{where}: expected 0 <= value < 1, got {value}")
    if fed.client_latency < 0:
        raise ConfigError(f"federation.client_latency (--client-latency): expected >= 0, got {fed.client_latency}")
    _positive("privacy.clip_norm (--dp-clip)", priv.clip_norm, allow_none=False)
    if priv.noise_multiplier < 0:
        raise ConfigError(f"privacy.noise_multiplier (--dp-noise): expected >= 0, got {priv.noise_multiplier}")
    if not 0 < priv.delta < 1:
        raise ConfigError(f"privacy.delta (--dp-delta): expected 0 < delta < 1, got {priv.delta}")
    if not 0 < priv.secagg_threshold <= 1:
        raise ConfigError(f"privacy.secagg_threshold: expected 0 < share <= 1, got {priv.secagg_threshold}")
    if adv.attack != "none" and adv.fraction > 0 and round(adv.fraction * fed.clients) < 1:  # (0: a clean baseline)
        raise ConfigError(f"--attack {adv.attack} with --attack-fraction {adv.fraction} of --clients {fed.clients}: "
                          f"round({adv.fraction} x {fed.clients}) is no attacker at all; raise --attack-fraction")
    if adv.attack == "label-flip" and cfg.model.task not in ("classification", "image-classification"):
        raise ConfigError(f"--attack label-flip with --task {cfg.model.task}: flipping needs one class label per row "
                          "(classification, image-classification); use --attack sign-flip, scale or noise")
    if adv.attack != "none" and adv.scale <= 0:
        raise ConfigError(f"adversary.scale (--attack-scale): expected > 0, got {adv.scale}")
    if priv.dp == "central" and fed.strategy != "fedavg":
        raise ConfigError(f"--dp central with --strategy {fed.strategy}: central DP replaces the merge with the mean of "
                          f"clipped updates (its sensitivity bound needs it); use --strategy fedavg or --dp local")
    _positive("privacy.secagg_clip (--secagg-clip)", priv.secagg_clip, allow_none=False)
    if priv.dp_sgd:
        _positive("privacy.sgd_clip (--dp-sgd-clip)", priv.sgd_clip, allow_none=False)
        _positive("privacy.sgd_noise (--dp-sgd-noise)", priv.sgd_noise, allow_none=False)
        if cfg.train.precision == "fp16":
            raise ConfigError("--dp-sgd with --precision fp16: fp16's loss scaling multiplies the per-example "
                              "gradients Opacus clips (by 65,536), so every example would be clipped to C / 65,536; "
                              "use bf16 or fp32")
        if cfg.method.name not in ("lora", "prefix"):
            raise ConfigError(f"--dp-sgd with --method {cfg.method.name}: Opacus computes per-example gradients for "
                              f"LoRA's and prefix tuning's modules only; use --method lora or prefix")
        from fedcustom.tasks import get_task

        reason = get_task(cfg.model.task).no_dp_sgd
        if reason:
            raise ConfigError(f"--dp-sgd with --task {cfg.model.task}: {reason}; use client-level DP (--dp) instead")
    if priv.secagg and priv.dp == "central":
        raise ConfigError("--secagg with --dp central: the server cannot clip updates it never sees; use --dp local "
                          "(clients clip and noise before masking)")
    if priv.secagg and cfg.codec.up != "raw":
        raise ConfigError(f"--secagg with --codec {cfg.codec.up}: secure aggregation uploads its own masked fixed-point "
                          f"encoding; leave --codec raw (--codec-down may compress the broadcast)")
    if priv.secagg and fed.strategy != "fedavg":
        raise ConfigError(f"--secagg with --strategy {fed.strategy}: under secure aggregation the server sees only "
                          f"the sum of updates, so only fedavg can run; robust strategies need each update")


def validate_scale(cfg: RunConfig) -> None:
    """Quantized backbones: only methods that leave the backbone frozen (its weights are not trainable in 4/8 bit)."""
    peft = ("lora", "prompt", "prefix")
    if cfg.model.load_in and cfg.method.name not in peft:
        raise ConfigError(f"model.load_in (--load-in {cfg.model.load_in}) with --method {cfg.method.name}: a quantized "
                          f"backbone stays frozen; use one of {', '.join(peft)}")


def validate_task(cfg: RunConfig) -> None:
    """Settings that only one task understands."""
    from fedcustom.tasks import get_task

    gen, task = cfg.generation, get_task(cfg.model.task)
    for where, value in [("generation.max_new_tokens (--max-new-tokens)", gen.max_new_tokens),
                         ("generation.eval_generations (--eval-generations)", gen.eval_generations)]:
        _positive(where, value, allow_none=False)
    if gen.samples < 0:
        raise ConfigError(f"generation.samples: expected >= 0, got {gen.samples}")
    if task.methods is not None and cfg.method.name not in task.methods:
        raise ConfigError(f"--task {task.name} with --method {cfg.method.name}: this task supports "
                          f"{', '.join(task.methods)}")
    _positive("model.image_size (--image-size)", cfg.model.image_size)
    if parse_partition(cfg.data.partition).kind == "column" and not task.instruction_data:
        raise ConfigError(f"--partition {cfg.data.partition}: column partitions need --task causal-lm (instruction "
                          f"data keeps its metadata columns)")
    if cfg.method.name == "split" and cfg.train.precision != "fp32":
        raise ConfigError(f"--method split with --precision {cfg.train.precision}: split learning exchanges and trains "
                          "fp32 activations and halves; use --precision fp32")
    if cfg.model.task == "causal-lm" and cfg.method.name == "split" and cfg.method.split_client == "prefix":
        raise ConfigError("--task causal-lm with --method split --split-client prefix: the prefix client half is built "
                          "for classification (it scores labels, not next tokens); use --split-client full or lora")
    if task.knowledge_over_vocabulary and cfg.method.name == "distill" and cfg.method.topk is None:
        raise ConfigError(f"--task {task.name} with --method distill: set --topk K (the knowledge on each public response "
                          "token is a distribution over the vocabulary; clients send its top K)")


def validate_convergence(cfg: RunConfig) -> None:
    """Server optimizer, drift correction, rate schedule, early stopping and the converged baseline: ranges."""
    fed, train, method = cfg.federation, cfg.train, cfg.method
    from fedcustom.methods.soft_init import check_init_spec  # the init grammar lives with the method

    check_init_spec(method.prefix_init, "method.prefix_init (--prefix-init)")
    check_init_spec(method.prompt_init, "method.prompt_init (--prompt-init)")
    _positive("federation.server_lr (--server-lr)", fed.server_lr)
    _positive("federation.server_eps (--server-eps)", fed.server_eps, allow_none=False)
    _positive("federation.early_stop_patience (--early-stop-patience)", fed.early_stop_patience)
    if not 0 <= fed.server_momentum < 1:
        raise ConfigError(f"federation.server_momentum (--server-momentum): expected 0 <= momentum < 1, got "
                          f"{fed.server_momentum}")
    if len(fed.server_betas) != 2 or not all(0 <= b < 1 for b in fed.server_betas):
        raise ConfigError(f"federation.server_betas (--server-betas): expected two numbers in [0, 1) as BETA1,BETA2, "
                          f"got {','.join(f'{b:g}' for b in fed.server_betas) or 'nothing'}")
    for where, value in [("federation.prox_mu (--prox-mu)", fed.prox_mu),
                         ("federation.early_stop_min_delta (--early-stop-min-delta)", fed.early_stop_min_delta),
                         ("federation.early_stop_min_rounds (--early-stop-min-rounds)", fed.early_stop_min_rounds),
                         ("train.warmup_rounds (--warmup-rounds)", train.warmup_rounds)]:
        if not value >= 0:
            raise ConfigError(f"{where}: expected a number >= 0, got {value}")
    if train.warmup_rounds >= fed.rounds and train.warmup_rounds > 0:
        raise ConfigError(f"train.warmup_rounds (--warmup-rounds): {train.warmup_rounds} leaves no round at the full "
                          f"rate of a {fed.rounds}-round run; expected fewer than --rounds")
    _positive("train.centralized_lr (--centralized-lr)", train.centralized_lr)
    _positive("train.centralized_max_epochs", train.centralized_max_epochs, allow_none=False)
    _positive("train.centralized_patience", train.centralized_patience, allow_none=False)
    if not 0 < train.centralized_val_fraction <= 0.5:
        raise ConfigError(f"train.centralized_val_fraction: expected 0 < fraction <= 0.5, got "
                          f"{train.centralized_val_fraction}")
