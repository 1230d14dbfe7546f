"""Heterogeneous LoRA ranks and how factors merge (issue 21, item 3): a client of rank r sends a rank-r update of
the adapter's shapes; ffa (frozen A), svd (products averaged, then factored) and stack (products averaged and merged
into the backbone) are exact where averaging A and B separately is not."""

from __future__ import annotations

import pytest
import torch

from fedcustom.assemble import check_runtime_support
from fedcustom.config import ConfigError
from fedcustom.methods.lora_stack import base_weight_name
from fedcustom.runner import build_job, execute
from fedcustom.strategies.lora_svd import lora_pairs

from conftest import TINY_LR


def _run(tiny_config, **overrides) -> tuple[object, list[tuple[dict[str, torch.Tensor], int]]]:
    """A 2-client, 1-round LoRA run of rank 4; returns the job and every upload with its example count."""
    job = build_job(tiny_config(method__name="lora", method__lora_r=4, train__lr=TINY_LR["lora"],
                                federation__rounds=1, **overrides))
    client, uploads = job.server.runtime.local_handler, []
    train = client.train

    def spy(node, message):
        reply = train(node, message)
        uploads.append((job.server.codec.decode(reply.payload), reply.num_examples))
        return reply

    client.train = spy
    execute(job)
    return job, uploads


def _mean_product(uploads, a_name: str, b_name: str, a_of=None) -> torch.Tensor:
    """sum p_k B_k A_k in float64 (``a_of(k)``: client k's A when it does not travel)."""
    total = sum(n for _, n in uploads)
    return sum(n / total * (s[b_name].double() @ (a_of(k) if a_of else s[a_name]).double())
               for k, (s, n) in enumerate(uploads))


def test_a_client_of_rank_r_sends_a_rank_r_update_of_the_adapters_shapes(tiny_config) -> None:
    # Execute: ranks 2 and 4 on a rank-4 adapter
    job, uploads = _run(tiny_config, method__lora_ranks="2,4")
    # Assert: same shapes; client 0's components 2.. are exactly zero, client 1's are not
    pairs = lora_pairs(list(job.server.global_state))
    assert pairs and len(uploads) == 2
    (low, _), (high, _) = uploads
    for a_name, b_name in pairs.items():
        assert low[a_name].shape == high[a_name].shape == (4, low[a_name].shape[1])
        assert torch.count_nonzero(low[a_name][2:]) == 0 and torch.count_nonzero(low[b_name][:, 2:]) == 0
        assert torch.count_nonzero(low[b_name][:, :2]) > 0
        assert torch.count_nonzero(high[a_name][2:]) > 0 and torch.count_nonzero(high[b_name][:, 2:]) > 0


def test_ffa_freezes_a_and_averages_b_exactly(tiny_config) -> None:
    # Execute: FFA-LoRA with ranks 2 and 4
    job, uploads = _run(tiny_config, method__lora_ranks="2,4", method__lora_aggregation="ffa")
    # Assert: A never travels; the global product with the shared A is the mean of the clients' products
    names = [n for n, p in job.model.named_parameters() if "lora_A" in n]
    assert names and not any(n in job.server.global_state for n in names)
    assert all(not any("lora_A" in n for n in state) for state, _ in uploads)
    ranks = job.server.runtime.local_handler.capacity
    params = dict(job.model.named_parameters())
    for a_name in names:
        b_name = a_name.replace("lora_A", "lora_B")
        layer = next(m for m in ranks.layers if m.lora_A["default"].weight is params[a_name])
        a_init = ranks.frozen_a[id(layer)]["default"].double()
        masked = lambda k: torch.cat([a_init[: (2, 4)[k]], torch.zeros_like(a_init[(2, 4)[k]:])])  # noqa: E731
        expected = _mean_product(uploads, a_name, b_name, masked)
        torch.testing.assert_close(job.server.global_state[b_name].double() @ a_init, expected, rtol=0, atol=1e-6)


def test_svd_merges_the_products_exactly_where_averaging_factors_does_not(tiny_config) -> None:
    # Execute: ranks 1 and 2 on a rank-4 adapter (their products fit in rank 4), merged by svd
    job, uploads = _run(tiny_config, method__lora_ranks="1,2", method__lora_aggregation="svd")
    # Assert: the global B A equals the mean of the clients' B_k A_k; the mean of the factors would not
    pairs = lora_pairs(list(job.server.global_state))
    total = sum(n for _, n in uploads)
    worst_factor_error = 0.0
    for a_name, b_name in pairs.items():
        expected = _mean_product(uploads, a_name, b_name)
        merged = job.server.global_state[b_name].double() @ job.server.global_state[a_name].double()
        torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
        mean_b = sum(n / total * s[b_name].double() for s, n in uploads)
        mean_a = sum(n / total * s[a_name].double() for s, n in uploads)
        worst_factor_error = max(worst_factor_error, float((mean_b @ mean_a - expected).abs().max()))
    assert worst_factor_error > 1e-4


def test_stack_merges_each_rounds_exact_mean_product_into_the_backbone(tiny_config) -> None:
    # Arrange: ranks 1 and 2 on a rank-4 adapter, 2 rounds; record the backbone weights each client trained on
    job = build_job(tiny_config(method__name="lora", method__lora_r=4, method__lora_alpha=8, method__lora_ranks="1,2",
                                method__lora_aggregation="stack", train__lr=TINY_LR["lora"], federation__rounds=2))
    client, server = job.server.runtime.local_handler, job.server
    adapter = {k: v.clone() for k, v in server.global_state.items() if "lora_" in k}
    rounds: dict[int, list] = {}
    train = client.train

    def spy(node, message):
        reply = train(node, message)
        rounds.setdefault(message.round, []).append(
            (server.codec.decode(reply.payload), reply.num_examples, client.stacked.base_state()))
        return reply

    client.train = spy
    merged_after: dict[int, dict[str, torch.Tensor]] = {}
    run_round = server.run_round

    def record(rnd, *args, **kwargs):
        result = run_round(rnd, *args, **kwargs)
        merged_after[rnd] = {k: server.global_state[k].clone() for k in server.broadcast_only}
        return result

    server.run_round = record
    # Execute
    execute(job)
    # Assert: uploads carry no backbone weight; round 1 trained on the pretrained weights, round 2 on round 1's
    # merge; each round's new W is W + s * sum p_k B_k A_k; the adapter restarts at A_0, B = 0 each round
    pairs = lora_pairs(list(adapter))
    assert pairs and sorted(rounds) == [1, 2] and all(len(r) == 2 for r in rounds.values())
    assert not any(base_weight_name(a) in state for r in rounds.values() for state, _, _ in r for a in pairs)
    scaling = 8 / 4
    for rnd, before in [(1, client.stacked.initial), (2, merged_after[1])]:
        uploads = [(state, n) for state, n, _ in rounds[rnd]]
        for a_name, b_name in pairs.items():
            w_name = base_weight_name(a_name)
            assert all(torch.equal(trained_on[w_name], before[w_name]) for _, _, trained_on in rounds[rnd])
            expected = before[w_name].double() + scaling * _mean_product(uploads, a_name, b_name)
            torch.testing.assert_close(merged_after[rnd][w_name].double(), expected, rtol=0, atol=1e-6)
            assert float((merged_after[rnd][w_name] - before[w_name]).abs().max()) > 1e-5  # it did move
    assert all(torch.equal(server.global_state[k], v) for k, v in adapter.items())
    assert all(not torch.count_nonzero(v) for k, v in adapter.items() if "lora_B" in k)


def test_stack_saves_the_merged_model_and_its_baseline_starts_from_the_pretrained_backbone(tiny_config,
                                                                                          monkeypatch) -> None:
    import fedcustom.runner as runner
    from transformers import AutoModelForSequenceClassification

    # Arrange: a stack run with the same-passes baseline; note the backbone weights the baseline starts from
    job = build_job(tiny_config(method__name="lora", method__lora_r=4, method__lora_aggregation="stack",
                                train__lr=TINY_LR["lora"], train__centralized=True))
    stacked, baseline_start = job.server.runtime.local_handler.stacked, {}
    same_passes = runner.run_same_passes

    def spy(*args, **kwargs):
        baseline_start.update(stacked.base_state())
        return same_passes(*args, **kwargs)

    monkeypatch.setattr(runner, "run_same_passes", spy)
    # Execute
    execute(job)
    # Assert: a whole model (no adapter) that transformers loads, scoring as the global model does; the baseline
    # started from the pretrained weights, not the federated merge
    assert job.model_dir.name == "model" and not (job.model_dir / "adapter_config.json").exists()
    saved = AutoModelForSequenceClassification.from_pretrained(job.model_dir).eval()
    job.load_model()
    job.model.eval()
    inputs = job.tokenizer(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(saved(**inputs).logits, job.model(**inputs).logits, rtol=0, atol=1e-5)
    assert baseline_start and all(torch.equal(baseline_start[k], v) for k, v in stacked.initial.items())
    assert any(not torch.equal(job.server.global_state[k], v) for k, v in stacked.initial.items())


def test_stack_with_a_private_head_saves_each_clients_whole_model(tiny_config) -> None:
    # Arrange: stack with --personalize head; each client's own model is saved under clients/<id>/ (once an adapter
    # over the pretrained backbone, which lacks the merged federated training: logits off by up to 0.15)
    from transformers import AutoModelForSequenceClassification

    job = build_job(tiny_config(method__name="lora", method__lora_r=4, method__lora_aggregation="stack",
                                federation__personalize="head", train__lr=TINY_LR["lora"]))
    # Execute
    execute(job)
    # Assert: client 1's saved folder is a whole model that scores as the client's own model in memory
    saved = AutoModelForSequenceClassification.from_pretrained(job.out / "clients" / "1" / "model").eval()
    job.load_model(1)
    job.model.eval()
    inputs = job.tokenizer(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(saved(**inputs).logits, job.model(**inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("overrides, expected", [
    ({"method__lora_ranks": "2,x"}, "expected comma-separated integers"),
    ({"method__lora_aggregation": "ffa", "federation__personalize": "dual-lora"}, "FFA's frozen A would be trained"),
    ({"method__lora_ranks": "2,16"}, "between 1 and the adapter's rank --lora-r 8"),
    ({"method__lora_ranks": "2,4", "method__name": "prefix"}, "use --method lora"),
    ({"method__lora_aggregation": "svd", "method__name": "lora", "federation__strategy": "median"},
     "--lora-aggregation svd with --strategy median"),
    ({"method__lora_aggregation": "ffa", "federation__personalize": "lora-b-local"}, "use --lora-aggregation fedavg"),
    ({"method__lora_aggregation": "stack", "federation__strategy": "krum:0"}, "--lora-aggregation stack with --strategy"),
    ({"method__lora_aggregation": "stack", "federation__scaffold": True, "privacy__secagg": True},
     "--lora-aggregation stack with --secagg, --scaffold"),
    ({"method__lora_aggregation": "stack", "federation__personalize": "dual-lora"}, "--personalize dual-lora"),
])
def test_bad_capacity_settings_are_one_clear_error(tiny_config, overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_runtime_support(tiny_config(**{"method__name": "lora", **overrides}))
