"""FedDF and MEKD as Flower strategies: schedule, wire protocol, faults, hard answers, end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetkd import protocol as P
from hetkd.config import ConfigError, to_yaml
from hetkd.data import build_federation
from hetkd.distill.codec import decode_answers, encode_answers
from hetkd.distill.deprivatization import GanSettings
from hetkd.distill.emulation import MEKDSettings, freeze
from hetkd.distill.ensemble import EnsembleSettings, class_balanced, ensemble_responses, teacher_logits
from hetkd.distill.generative import make_generator
from hetkd.distill.losses import ReferenceKD
from hetkd.distill.queries import QuerySpec, generate_queries, reference_rows, resolve_queries
from hetkd.simulations.registry import build_strategy, check_strategy
from hetkd.strategies import MEKD, EnsembleDistill, FedDF
from hetkd.strategies.ensemble_distill import EnsembleTargets
from tests.conftest import InProcessGrid, small_config

SMALL = ("strategy.ensemble.warmup_rounds=1", "strategy.ensemble.deprivatize_rounds=2", "mekd.gan.steps=40",
         "mekd.gan.batch_size=16", "strategy.ensemble.server_steps=20", "strategy.ensemble.num_queries=64",
         "training.local_epochs=1", "strategy.ensemble.min_steps=0", "reference.size=100", "num-server-rounds=5",
         "strategy.ensemble.student=mlp_s")  # the default ResNet-8 student took 2/3 of a run's time


def _start(cfg, grid, rounds):
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy.start(grid=grid, num_rounds=rounds, on_round_end=reports.append)
    return strategy, reports


def _public(n=40):
    return torch.rand(n, 1, 8, 8) * 2 - 1


# --------------------------------------------------------------------------- pure pieces


def test_phase_schedule_and_queries():
    mekd = MEKD(num_classes=10, public_inputs=_public(), input_shape=(1, 8, 8),
                ensemble=EnsembleSettings(student="", warmup_rounds=2, deprivatize_rounds=3, num_queries=32),
                mekd=MEKDSettings(gan=GanSettings(steps=10, batch_size=8)))
    assert [mekd.phase(r) for r in range(1, 9)] == ["warmup"] * 2 + ["deprivatize"] * 3 + ["distill"] * 3
    assert mekd.gan_steps_per_round() == 4  # ceil(10 / 3): every step is run
    assert mekd.make_query(1, "warmup") is None
    q = mekd.make_query(3, "deprivatize")
    assert (q.source, q.count, q.batch_size, q.train_mode) == ("generator", 32, 8, True)
    q = mekd.make_query(6, "distill")
    assert (q.source, q.count, q.train_mode) == ("generator", 32, False)
    assert mekd.make_query(7, "distill").seed != q.seed  # a fresh batch every round

    feddf = FedDF(num_classes=10, public_inputs=_public(20),
                  ensemble=EnsembleSettings(student="", warmup_rounds=1, num_queries=64))
    assert [feddf.phase(r) for r in range(1, 4)] == ["warmup", "distill", "distill"]
    q = feddf.make_query(2, "distill")
    assert (q.source, q.count) == ("reference", 20)  # never more rows than the public set holds
    assert feddf.distill.w_f == 0.0


def test_strategies_reject_bad_arguments_by_name():
    with pytest.raises(ValueError, match="weighting"):
        FedDF(num_classes=10, public_inputs=_public(), ensemble=EnsembleSettings(student="", weighting="closest"))
    with pytest.raises(ValueError, match="response"):  # FedDF always answers soft: the base class takes response
        EnsembleDistill(num_classes=10, public_inputs=_public(), response="logits",
                        ensemble=EnsembleSettings(student=""))
    with pytest.raises(ValueError, match="deprivatize_rounds"):
        MEKD(num_classes=10, public_inputs=_public(), input_shape=(1, 8, 8),
             ensemble=EnsembleSettings(student="", deprivatize_rounds=0))
    with pytest.raises(ValueError, match="input_shape"):
        MEKD(num_classes=10, public_inputs=_public(), input_shape=(1, 28, 28), ensemble=EnsembleSettings(student=""))


def test_too_few_rounds_and_logit_answers_are_rejected_by_key(tmp_path):
    with pytest.raises(ConfigError, match="simulation.num_rounds"):
        check_strategy(small_config(tmp_path, "strategy=mekd", "num-server-rounds=7"))  # 2 warm-up + 5 deprivatize
    with pytest.raises(ConfigError, match="mekd.response"):
        check_strategy(small_config(tmp_path, "strategy=mekd", "num-server-rounds=10", "mekd.response=logits"))
    with pytest.raises(ValueError, match="strategy.ensemble.student"):
        small_config(tmp_path, "strategy.ensemble.student=resnet9")


def test_ensemble_responses_mean_weighted_and_vote():
    p = torch.tensor([[[0.8, 0.2]], [[0.4, 0.6]], [[0.0, 1.0]]])  # 3 teachers, 1 query, 2 classes
    mean, kind = ensemble_responses(p, "soft", torch.ones(1, 3))
    assert kind == "soft" and torch.allclose(mean[0, 0], torch.tensor([0.4, 0.6]))
    w = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    mixed, _ = ensemble_responses(p, "soft", w)
    assert torch.allclose(mixed[0, 0], torch.tensor([0.6, 0.4])) and mixed[1].abs().sum() == 0
    hard = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]])
    vote, kind = ensemble_responses(hard, "hard", torch.ones(1, 3))
    assert kind == "hard" and vote[0, 0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="weights"):
        ensemble_responses(p, "soft", torch.ones(1, 2))


def test_class_balancing_removes_the_lean_towards_classes_many_devices_know():
    truth = torch.arange(6) % 3  # inputs drawn evenly from 3 classes
    clean = torch.nn.functional.one_hot(truth, 3).float() * 0.5 + 0.5 / 3
    leaning = clean + torch.tensor([0.6, 0.0, 0.0])  # most devices know class 0 and say it everywhere
    leaning = leaning / leaning.sum(1, keepdim=True)
    assert (leaning.argmax(1) == 0).all()
    balanced = class_balanced(leaning)
    assert torch.equal(balanced.argmax(1), truth) and torch.allclose(balanced.sum(1), torch.ones(6))
    assert torch.allclose(class_balanced(clean), clean), "an ensemble without a lean is left as it is"
    # a per-device batch (m, N, C): an all-zero ensemble and a class nobody predicts stay zero
    stacked = torch.stack([torch.cat([leaning, torch.zeros(6, 1)], 1), torch.zeros(6, 4)])
    out = class_balanced(stacked)
    assert torch.isfinite(out).all() and out[1].abs().sum() == 0 and out[0, :, 3].abs().sum() == 0
    # hard answers: two devices know only class 0; the balanced vote follows the one that knows both
    votes = torch.nn.functional.one_hot(torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]]), 2).float()
    assert ensemble_responses(votes, "hard", torch.ones(1, 3))[0][0].argmax(1).tolist() == [0, 0, 0, 0]
    assert ensemble_responses(votes, "hard", torch.ones(1, 3), balance=True)[0][0].argmax(1).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="N, C"):
        class_balanced(torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        class_balanced(-leaning)


def test_a_generators_skewed_samples_leave_the_real_rows_class_balance_alone():
    """MEKD's mixed query: reference rows, then G's samples, which the devices mostly call class 0.
    Balanced together, that lean would turn real rows of class 0 into another class; each source
    is balanced on its own."""
    truth = torch.arange(6) % 3
    real = torch.nn.functional.one_hot(truth, 3).float() * 0.2 + 0.8 / 3  # flat but right, no lean
    generated = torch.tensor([[0.9, 0.05, 0.05]]).repeat(6, 1)  # G draws class-0 blobs
    answers = torch.cat([real, generated]).unsqueeze(0)
    together, _ = ensemble_responses(answers, "soft", torch.ones(1, 1), balance=True)
    apart, _ = ensemble_responses(answers, "soft", torch.ones(1, 1), balance=True, balance_groups=[6, 6])
    assert not torch.equal(together[0, :6].argmax(1), truth), "the joint correction pushes real rows off class 0"
    assert torch.allclose(apart[0, :6], class_balanced(real)) and torch.equal(apart[0, :6].argmax(1), truth)
    assert torch.allclose(apart[0, 6:], class_balanced(generated))
    assert QuerySpec("generator", 0, 12, reference_count=6).source_sizes == (6, 6)
    assert QuerySpec("reference", 0, 12).source_sizes == (12,)
    with pytest.raises(ValueError, match="balance_groups.*12 inputs.*\\[6, 5\\]"):
        ensemble_responses(answers, "soft", torch.ones(1, 1), balance=True, balance_groups=[6, 5])


def test_answers_on_the_wire_round_trip_and_reject_bad_input():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(5), torch.tensor([3, 1, 4, 1, 5])] += 3.0  # a clear winner: uint8 keeps the argmax
    soft = decode_answers(encode_answers(logits, "soft", "uint8"), "soft", 10)
    assert torch.allclose(soft.sum(1), torch.ones(5)) and (soft.argmax(1) == logits.argmax(1)).all()
    hard = encode_answers(logits, "hard")
    assert hard.dtype == np.uint8 and hard.shape == (5,)
    assert torch.equal(decode_answers(hard, "hard", 10).argmax(1), logits.argmax(1))
    with pytest.raises(ValueError, match="outside"):
        decode_answers(np.array([3, 12], dtype=np.uint8), "hard", 10)
    with pytest.raises(ValueError, match="shape"):
        decode_answers(encode_answers(logits, "soft"), "soft", 9)


def test_a_device_rebuilds_exactly_the_servers_queries_from_weights_and_a_seed():
    gan = GanSettings(steps=0, batch_size=8)
    g = make_generator((1, 8, 8), 10)
    with torch.no_grad():  # move the running statistics away from their initial values
        g.train()(torch.randn(64, 10) * 3)
    stats = {k: v.clone() for k, v in g.state_dict().items()}
    server = MEKD(num_classes=10, public_inputs=_public(), input_shape=(1, 8, 8), mekd=MEKDSettings(gan=gan),
                  ensemble=EnsembleSettings(student=""))
    spec = server.generator_spec()
    device_g = make_generator((1, 8, 8), 10, (spec.low, spec.high), spec.width)
    device_g.load_state_dict(g.state_dict())
    for train_mode in (True, False):
        spec = QuerySpec("generator", seed=7, count=32, batch_size=8, train_mode=train_mode)
        assert torch.equal(resolve_queries(spec, generator=g), resolve_queries(spec, generator=freeze(device_g)))
    assert all(torch.equal(v, stats[k]) for k, v in g.state_dict().items()), "querying must not move G"
    z, x = generate_queries(g, 7, 16, 8, train_mode=True)
    assert z.shape == (16, 10) and x.shape == (16, 1, 8, 8)
    with pytest.raises(ValueError, match="multiple"):
        generate_queries(g, 7, 10, 8, train_mode=True)



def test_a_mixed_query_is_reference_rows_then_generator_samples_on_server_and_device_alike():
    g = make_generator((1, 8, 8), 10)
    reference = _public(40)
    spec = QuerySpec("generator", seed=5, count=24, batch_size=8, reference_count=10)
    assert spec.generated_count == 14
    x = resolve_queries(spec, generator=g, reference_inputs=reference)
    rows = reference_rows(spec, len(reference))
    assert x.shape == (24, 1, 8, 8) and len(set(rows.tolist())) == 10
    assert torch.equal(x[:10], reference[rows]), "the first reference_count inputs are real reference rows"
    assert torch.equal(x[10:], generate_queries(g, 5, 14, 8, train_mode=False)[1])
    device_g = make_generator((1, 8, 8), 10)
    device_g.load_state_dict(g.state_dict())
    assert torch.equal(x, resolve_queries(spec, generator=freeze(device_g), reference_inputs=reference.clone()))
    request = P.EnsembleDistill(server_round=1, kd=EnsembleSettings().kd_term(), loss=MEKDSettings().distill.loss(),
                                response="soft", answer_model="private", precision="float16", query=spec)
    assert P.EnsembleDistill.from_record(request.to_record()).query == spec  # the mix survives the wire
    with pytest.raises(ValueError, match="mixes in 10 reference rows and no reference set is held here"):
        resolve_queries(spec, generator=g)
    with pytest.raises(ValueError, match="reference set has 5"):
        resolve_queries(spec, generator=g, reference_inputs=reference[:5])
    with pytest.raises(ValueError, match=r"'reference_count': must be in \[0, count = 24\), got 24"):
        QuerySpec("generator", seed=5, count=24, reference_count=24)
    with pytest.raises(ValueError, match="'reference_count': only a 'generator' query mixes"):
        QuerySpec("reference", seed=5, count=24, reference_count=4)


def test_mekd_reference_queries_must_fit_the_queries_and_the_reference_set(tmp_path):
    mekd = MEKD(num_classes=10, public_inputs=_public(40), input_shape=(1, 8, 8),
                ensemble=EnsembleSettings(student="", num_queries=32),
                mekd=MEKDSettings(reference_queries=12, gan=GanSettings(steps=8, batch_size=8)))
    q = mekd.make_query(9, "distill")
    assert (q.source, q.count, q.reference_count) == ("generator", 32, 12)
    assert mekd.make_query(3, "deprivatize").reference_count == 0, "G trains on its own samples only"
    only_rows = MEKD(num_classes=10, public_inputs=_public(40), input_shape=(1, 8, 8),
                     ensemble=EnsembleSettings(student="", num_queries=32),
                     mekd=MEKDSettings(reference_queries=32, gan=GanSettings(steps=8, batch_size=8)))
    q = only_rows.make_query(9, "distill")  # every query a reference row: G enters through the loss only
    assert (q.source, q.count) == ("reference", 32) and only_rows.loss_generator() is None  # G not final yet
    assert only_rows.make_query(3, "deprivatize").source == "generator"
    for bad, ensemble in ((33, EnsembleSettings(student="", num_queries=32)),
                          (41, EnsembleSettings(student="", num_queries=64))):
        with pytest.raises(ValueError, match=f"mekd.reference_queries \\({bad}\\)"):
            MEKD(num_classes=10, public_inputs=_public(40), input_shape=(1, 8, 8), ensemble=ensemble,
                 mekd=MEKDSettings(reference_queries=bad))
    with pytest.raises(ConfigError, match="mekd.reference_queries"):
        small_config(tmp_path, "strategy=mekd", "mekd.reference_queries=-1")
    with pytest.raises(ConfigError, match="mekd.reference_queries.*num_queries \\(64\\)"):
        check_strategy(small_config(tmp_path, "strategy=mekd", *SMALL, "mekd.reference_queries=65"))


# --------------------------------------------------------------------------- protocol (in-process grid)


def _replies(grid):
    return [t for t in grid.traffic if t.message.metadata.message_type == P.EnsembleDistill.message_type]


def _request(t) -> P.EnsembleDistill:
    return P.EnsembleDistill.from_record(t.message.content)


def _answers(t) -> P.QueryAnswers:
    return P.QueryAnswers.from_record(t.reply.content)


def test_only_answers_generator_weights_and_scalars_cross_the_wire(tmp_path):
    cfg = small_config(tmp_path, "strategy=mekd", *SMALL, devices=3)
    grid = InProcessGrid(3)
    strategy, reports = _start(cfg, grid, rounds=5)
    assert [r.metrics["phase"] for r in reports] == ["warmup", "deprivatize", "deprivatize", "distill", "distill"]
    g_keys = set(strategy.generator.state_dict())
    generator_sends = {}
    for t in _replies(grid):
        down, up = t.message.content, t.reply.content
        assert set(down.keys()) <= {P.CONFIG, P.ARRAYS, "generator_weights"}
        request = _request(t)
        assert request.query_inputs is None
        if request.generator_weights is not None:
            assert set(request.generator_weights.keys()) == g_keys
            generator_sends.setdefault(t.message.metadata.dst_node_id, []).append(request.server_round)
        if request.targets is not None:
            assert set(down[P.ARRAYS].keys()) == {"targets.answers"}
        else:
            assert P.ARRAYS not in down
        assert P.DEVICE_TO_SERVER[P.EnsembleDistill.message_type] == {P.METRICS, P.CONFIG, P.ARRAYS}
        assert set(up.keys()) <= {P.METRICS, P.CONFIG, P.ARRAYS}, "only answers and metrics leave a device"
        assert set(up[P.CONFIG].keys()) == {"distilled"}
        if P.ARRAYS in up:
            assert set(up[P.ARRAYS].keys()) == {"answers"}
            count = request.query.count
            assert _answers(t).answers.shape == (count, 10)
    # G travels in each deprivatization round (it changes) and once more, frozen, for distillation
    assert all(rounds == [2, 3, 4] for rounds in generator_sends.values()) and len(generator_sends) == 3
    assert reports[-1].metrics["student_accuracy"] is not None
    assert not any(r.failures for r in reports)


def test_a_device_that_drops_out_during_deprivatization_does_not_stall_the_round(tmp_path):
    cfg = small_config(tmp_path, "strategy=mekd", *SMALL, devices=3)
    grid = InProcessGrid(3)
    gone = grid.node_ids[1]

    def schedule(report):
        if report.round == 1:
            grid.faults[gone] = "drop"
        if report.round == 2:
            grid.faults.pop(gone)

    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy.start(grid=grid, num_rounds=5, on_round_end=lambda r: (reports.append(r), schedule(r)))
    round2 = reports[1]
    assert round2.metrics["phase"] == "deprivatize" and round2.metrics["gan_steps"] == 20
    assert round2.metrics["answering_devices"] == 2
    assert [f["device"] for f in round2.failures] == [1]
    # back in round 3, it is sent G again (it never acknowledged round 2's) and takes part
    back = [t for t in _replies(grid) if t.message.metadata.dst_node_id == gone
            and _request(t).server_round == 3][0]
    assert _request(back).generator_weights is not None and back.reply is not None and not back.reply.has_error()
    assert reports[2].metrics["answering_devices"] == 3


def test_g_is_final_after_the_last_deprivatization_round_even_when_no_device_answered(tmp_path):
    """Every device drops out of round 3, the last deprivatization round: G is frozen all the same,
    so the server's loss and the devices' (which freeze the copy they hold) use the same G."""
    cfg = small_config(tmp_path, "strategy=mekd", *SMALL, devices=3)
    grid = InProcessGrid(3)

    def schedule(report):
        if report.round == 2:
            grid.faults.update({node: "drop" for node in grid.node_ids})
        if report.round == 3:
            grid.faults.clear()

    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy.start(grid=grid, num_rounds=5, on_round_end=lambda r: (reports.append(r), schedule(r)))
    assert len(reports[2].failures) == 3 and "gan_steps" not in reports[2].metrics
    assert not strategy.generator.training and not any(p.requires_grad for p in strategy.generator.parameters())
    assert strategy.loss_generator() is strategy.generator
    sent = {_request(t).generator.version for t in _replies(grid) if _request(t).server_round == 4}
    assert sent == {strategy.generator_version}
    assert reports[3].metrics["answering_devices"] == 3 and not reports[3].failures and not reports[4].failures


def test_hard_responses_carry_no_soft_information(tmp_path):
    cfg = small_config(tmp_path, "strategy=mekd", "mekd.response=hard", "mekd.distill.hard_margin=4.5", *SMALL, devices=3)
    grid = InProcessGrid(3)
    _, reports = _start(cfg, grid, rounds=5)
    answered = 0
    for t in _replies(grid):
        request = _request(t)
        assert request.loss.hard_margin == 4.5  # the devices read a label as the server does
        labels = _answers(t).answers
        if labels is not None:
            assert labels.ndim == 1 and labels.dtype == np.uint8 and labels.max() < 10
            answered += 1
        if request.targets is not None:
            targets = request.targets.answers
            assert request.targets.kind == "hard"
            assert targets.ndim == 1 and targets.dtype == np.uint8
    assert answered == 12  # 3 devices x 4 rounds after the warm-up
    assert reports[-1].metrics["student_accuracy"] is not None


def test_private_answers_never_echo_what_the_devices_distil(tmp_path):
    """With answer_model=private the devices' answers, and so the server's student, are the
    same whatever the devices distil (rho); with their own models the answers echo the targets."""

    def answers_and_student(answer_model, rho):
        cfg = small_config(tmp_path, "strategy=feddf", *SMALL, f"strategy.ensemble.answer_model={answer_model}",
                           f"strategy.ensemble.rho={rho}", devices=3)
        grid = InProcessGrid(3)
        strategy, reports = _start(cfg, grid, rounds=3)
        assert not any(r.failures for r in reports)
        sent = [t for t in _replies(grid) if _answers(t).answers is not None]
        assert all(_request(t).answer_model == answer_model for t in sent)
        trained = {k for t in sent if _request(t).targets is not None for k in t.reply.content[P.METRICS]}
        assert ("private_train_loss" in trained) == (answer_model == "private")
        answers = [_answers(t).answers for t in sent]
        return answers, reports[-1].metrics["student_accuracy"], strategy.student.state_dict()

    rounds_distilling = 1  # round 3: the devices distilled towards round 2's targets before answering
    for answer_model, echoes in (("private", False), ("personal", True)):
        a, acc_a, student_a = answers_and_student(answer_model, 0.0)
        b, acc_b, student_b = answers_and_student(answer_model, 0.9)
        assert len(a) == len(b) == 3 * 2
        differ = [not np.array_equal(x, y) for x, y in zip(a, b)]
        assert not any(differ[: -3 * rounds_distilling]), "before any distillation the runs agree"
        assert all(differ[-3:]) == echoes, answer_model
        assert all(torch.equal(student_a[k], student_b[k]) for k in student_a) == (not echoes)
        if not echoes:
            assert acc_a == acc_b
    with pytest.raises(ConfigError, match="strategy.ensemble.answer_model"):
        small_config(tmp_path, "strategy=mekd", "strategy.ensemble.answer_model=shared")
    with pytest.raises(ValueError, match="answer_model"):
        FedDF(num_classes=10, public_inputs=_public(), ensemble=EnsembleSettings(student="", answer_model="shared"))


def test_balanced_targets_are_the_plain_ensemble_corrected_to_a_uniform_class_prior(tmp_path):
    """Round 2 is the first distillation round: both runs get the same answers, so the
    only difference between their targets is the correction."""
    targets = {}
    for balance in (False, True):
        cfg = small_config(tmp_path, "strategy=feddf", f"strategy.ensemble.balance_classes={balance}", *SMALL,
                           devices=3)
        strategy, reports = _start(cfg, InProcessGrid(3), rounds=2)
        assert not any(r.failures for r in reports) and strategy.ensemble.balance_classes is balance
        targets[balance] = strategy.targets.common
    assert torch.allclose(targets[True], class_balanced(targets[False]), atol=1e-6)
    assert not torch.allclose(targets[True], targets[False])
    with pytest.raises(ValueError, match="balance_classes"):
        FedDF(num_classes=10, public_inputs=_public(), ensemble=EnsembleSettings(student="", balance_classes="yes"))
    with pytest.raises(ValueError, match="strategy.ensemble.balance_classes"):
        small_config(tmp_path, "strategy=feddf", "strategy.ensemble.balance_classes=sometimes")


def test_the_student_distils_on_the_last_rounds_queries_it_remembers(tmp_path):
    """MEKD draws fresh samples of the frozen G every distillation round (rounds 4-6 here):
    with ``student_memory=2`` the student distils on the last two rounds' samples and targets."""
    cfg = small_config(tmp_path, "strategy=mekd", "strategy.ensemble.student_memory=2", *SMALL,
                       "num-server-rounds=6", devices=3)
    strategy, reports = _start(cfg, InProcessGrid(3), rounds=6)
    assert not any(r.failures for r in reports)
    assert [r.metrics.get("student_inputs") for r in reports] == [None] * 3 + [64, 128, 128]
    remembered = [inputs for inputs, _, _ in strategy.student_memory]
    assert len(remembered) == 2
    for server_round, inputs in zip((5, 6), remembered):
        assert torch.equal(inputs, strategy.query_inputs(strategy.make_query(server_round, "distill")))
    assert torch.equal(strategy.student_memory[-1][1],
                       teacher_logits(strategy.targets.common, "soft", hard_margin=strategy.distill.hard_margin))
    assert all(generated.all() for _, _, generated in strategy.student_memory), "every query input is G's"
    state = strategy.state_dict()  # a checkpoint from before the memory said which rows are G's samples:
    state["student_memory"] = [(inputs, logits) for inputs, logits, _ in state["student_memory"]]
    strategy.load_state_dict(state)  # G's term then covered every row
    assert [g.tolist() for *_, g in strategy.student_memory] == [[True] * 64] * 2
    with pytest.raises(ValueError, match="student_memory"):
        FedDF(num_classes=10, public_inputs=_public(), ensemble=EnsembleSettings(student="", student_memory=-1))
    with pytest.raises(ConfigError, match="strategy.ensemble.student_memory"):
        small_config(tmp_path, "strategy=feddf", "strategy.ensemble.student_memory=-2")


def test_similarity_weighting_gives_each_device_its_own_targets(tmp_path):
    cfg = small_config(tmp_path, "strategy=feddf", "strategy.ensemble.weighting=similarity",
                       "strategy.ensemble.num_neighbours=1", *SMALL, devices=3)
    grid = InProcessGrid(3)
    strategy, reports = _start(cfg, grid, rounds=3)
    assert set(strategy.targets.own) == {0, 1, 2}
    assert not torch.equal(strategy.targets.own[0], strategy.targets.own[1])
    assert reports[-1].metrics["neighbour_distance_mean"] > 0
    last = [_request(t).targets.answers for t in _replies(grid)[-3:]]
    assert not np.array_equal(last[0], last[1])


# --------------------------------------------------------------------------- end to end (Flower runtime)


@pytest.mark.slow
def test_mekd_global_student_beats_chance_by_a_wide_margin(tmp_path):
    from hetkd.simulations import run

    # through Flower's Ray runtime, G's weights and samples on the wire; the student reached 0.68 (0.72 with
    # 300 GAN steps and 150 server steps a round, 5 s more) on a 2-core AMD EPYC
    cfg = small_config(tmp_path, "strategy=mekd", "num-server-rounds=5", "strategy.ensemble.warmup_rounds=2",
                       "strategy.ensemble.deprivatize_rounds=2", "mekd.gan.steps=200",
                       "strategy.ensemble.server_steps=100", "strategy.ensemble.num_queries=256",
                       "training.local_epochs=3", "reference.size=300", "partition.method=iid", devices=4)
    summary = run(cfg)
    assert summary["failures"] == 0
    assert summary["final_student_accuracy"] > 0.5, "10 classes: chance is 0.1"
    out = tmp_path / "run"
    for name in ("student.pt", "generator.pt", "samples.png", "metrics.jsonl"):
        assert (out / name).is_file(), name


def test_mekd_devices_answer_real_reference_rows_beside_generator_samples(tmp_path):
    cfg = small_config(tmp_path, "strategy=mekd", *SMALL, "mekd.reference_queries=24", devices=3)
    grid = InProcessGrid(3)
    strategy, reports = _start(cfg, grid, rounds=5)
    distilling = [t for t in _replies(grid) if _request(t).server_round >= 4]
    assert distilling
    for t in distilling:
        request = _request(t)
        assert (request.query.reference_count, request.query.count) == (24, 64)
        assert request.query_inputs is None, "a seed names the reference rows; no input travels"
        assert _answers(t).answers.shape == (64, 10)
    inputs = strategy.query_inputs(_request(distilling[-1]).query)
    rows = reference_rows(_request(distilling[-1]).query, len(strategy.public_inputs))
    assert torch.equal(inputs[:24], strategy.public_inputs[rows])
    assert reports[-1].metrics["student_inputs"] == 64 and not any(r.failures for r in reports)
    # the last deprivatization round (3) asks about the reference rows too: the student learns from them
    # then, and the devices distil towards the ensemble on them in round 4, as early as FedDF's would
    round_3 = [_request(t) for t in _replies(grid) if _request(t).server_round == 3]
    assert all(r.query.reference_count == 24 and r.query.count == 24 + 20 * 16 for r in round_3)
    assert [_request(t).query.reference_count for t in _replies(grid) if _request(t).server_round == 2] == [0] * 3
    assert reports[2].metrics["student_inputs"] == 24 and "student_loss" not in reports[1].metrics
    targets = [_request(t).targets for t in _replies(grid) if _request(t).server_round == 4]
    assert all(t.query.source == "reference" and t.query.count == 24 for t in targets)
    assert torch.equal(resolve_queries(targets[0].query, reference_inputs=strategy.public_inputs),
                       strategy.public_inputs[reference_rows(round_3[0].query, len(strategy.public_inputs))])
    assert strategy.distill_rounds() == 3 and strategy.student_learns(3) and not strategy.student_learns(2)


@pytest.mark.parametrize("device_loss", ["emulation", "kl"])
def test_mekd_on_reference_rows_only_keeps_g_in_the_loss(tmp_path, device_loss):
    """``mekd.reference_queries = num_queries``: the distillation rounds ask about reference rows
    only; the devices still receive the final G for the mapping-emulation loss, and no G at all
    when they distil with KL alone."""
    cfg = small_config(tmp_path, "strategy=mekd", *SMALL, "mekd.reference_queries=64",
                       f"mekd.device_loss={device_loss}", devices=3)
    check_strategy(cfg)
    grid = InProcessGrid(3)
    strategy, reports = _start(cfg, grid, rounds=5)
    assert not any(r.failures for r in reports)
    for t in (t for t in _replies(grid) if _request(t).server_round >= 4):
        request = _request(t)
        assert (request.query.source, request.query.count, request.query_inputs) == ("reference", 64, None)
        assert _answers(t).answers.shape == (64, 10)
        if device_loss == "kl":
            assert request.generator is None and request.generator_weights is None, "nothing needs G"
            continue
        assert request.generator.version == strategy.generator_version
        assert (request.generator_weights is not None) == (request.server_round == 4), "the frozen G, once"
    assert strategy.loss_generator() is strategy.generator and not strategy.generator.training
    assert [r.metrics.get("student_inputs") for r in reports] == [None, None, 64, 64, 64]


@pytest.mark.parametrize("device_loss", ["emulation", "kl"])
def test_mekd_devices_distil_with_kl_alone_when_asked_and_the_student_keeps_gs_term(tmp_path, monkeypatch,
                                                                                    device_loss):
    import hetkd.distill.emulation as emulation

    through, masks = [], []  # the generator each computed G term went through, and its rows
    loss = emulation.mapping_emulation_loss

    def recording(student_logits, target_logits, generator, **settings):
        if generator is not None:
            through.append(generator)
            masks.append(settings.get("generated"))
        return loss(student_logits, target_logits, generator, **settings)

    monkeypatch.setattr(emulation, "mapping_emulation_loss", recording)
    cfg = small_config(tmp_path, "strategy=mekd", *SMALL, "mekd.reference_queries=24",
                       f"mekd.device_loss={device_loss}", devices=3)
    grid = InProcessGrid(3)
    strategy, reports = _start(cfg, grid, rounds=5)
    assert not any(r.failures for r in reports)
    assert any(g is strategy.generator for g in through), "the student's loss keeps G's term"
    assert all(m is None for m in masks), "mekd.emulation_inputs=all (the default): G's term on every row"
    assert not any(_request(t).loss.generated_only for t in _replies(grid))
    on_devices = [g for g in through if g is not strategy.generator]
    sent = {_request(t).loss.w_f for t in _replies(grid)}
    if device_loss == "kl":
        assert sent == {0.0} and not on_devices
    else:
        assert sent == {strategy.distill.w_f} and on_devices and strategy.distill.w_f > 0


def test_a_query_says_which_of_its_inputs_are_gs_samples():
    assert QuerySpec("generator", 0, 5, reference_count=3).generated_rows().tolist() == [False] * 3 + [True] * 2
    assert QuerySpec("generator", 0, 4).generated_rows().all()
    assert QuerySpec("inputs", 0, 4).generated_rows().all(), "shipped inputs are G's samples"
    assert not QuerySpec("reference", 0, 4).generated_rows().any()


def test_a_device_passes_the_drawn_rows_generated_marks_to_the_loss():
    k, n = 4, 10
    inputs = torch.randn(n, 3)
    row_logits = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)  # row i's targets hold i
    generated = torch.arange(n) >= k
    seen = []

    def loss(student_logits, target_logits, generated):
        assert torch.equal(generated, target_logits[:, 0] >= k), "each drawn row keeps its own mark"
        seen.append(generated)
        return student_logits.sum() * 0

    term = ReferenceKD(inputs, row_logits, 0.5, 16, loss, torch.Generator().manual_seed(0), generated=generated)
    model = torch.nn.Linear(3, 2)
    term(model, torch.randn(2, 3), torch.tensor([0, 1]))
    term.public_loss(model)
    assert len(seen) == 2 and all(m.any() and not m.all() for m in seen)
    with pytest.raises(ValueError, match="generated must be one boolean per public input"):
        ReferenceKD(inputs, row_logits, 0.5, 16, loss, generated=generated[:5])


def test_mekd_puts_gs_term_on_gs_samples_only_when_asked(tmp_path, monkeypatch):
    """``mekd.emulation_inputs=generated``: the student's and the devices' G term covers G's
    samples and leaves the reference rows beside them to KL (``all``, the default, covers every
    row: the test of ``mekd.device_loss`` below)."""
    import hetkd.distill.emulation as emulation

    masks = {"server": [], "devices": []}
    loss = emulation.mapping_emulation_loss

    def recording(student_logits, target_logits, generator, **settings):
        if generator is not None:
            masks["server" if generator is strategy.generator else "devices"].append(settings.get("generated"))
        return loss(student_logits, target_logits, generator, **settings)

    monkeypatch.setattr(emulation, "mapping_emulation_loss", recording)
    cfg = small_config(tmp_path, "strategy=mekd", *SMALL, "mekd.reference_queries=24", "mekd.device_loss=emulation",
                       "mekd.emulation_inputs=generated", devices=3)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    grid, reports = InProcessGrid(3), []
    strategy.start(grid=grid, num_rounds=5, on_round_end=reports.append)
    assert not any(r.failures for r in reports) and masks["server"] and masks["devices"]
    assert {_request(t).loss.generated_only for t in _replies(grid)} == {True}
    assert all(m is not None for m in masks["server"] + masks["devices"])
    # round 3's transfer set is the reference rows alone (its G term is zero), rounds 4-5 mix in 40 of G's samples
    share = torch.cat(masks["server"]).float().mean().item()
    assert 0.2 < share < 0.55, share  # 2 of 3 rounds at 40 / 64
    rows, generated = torch.arange(64), QuerySpec("generator", 1, 64, reference_count=24).generated_rows()
    seen = []
    monkeypatch.setattr(strategy, "student_loss", lambda s, t, g: seen.append((t, g)) or s.sum() * 0)
    common = torch.softmax(torch.stack([rows.float() / 64, -rows.float() / 64] + [torch.zeros(64)] * 8, 1), 1)
    query = QuerySpec("generator", 1, 64, reference_count=24)
    strategy.distill_student(6, strategy.query_inputs(query), EnsembleTargets(query, "soft", common))
    assert len(seen) == strategy.ensemble.server_steps
    for target, mask in seen:  # each drawn row brings its own mark: row i's target logit gap grows with i
        gap = (target[:, 0] - target[:, 1]) * 32 + 1e-4
        assert torch.equal(mask, generated[gap.floor().long().clamp(0, 63)])


def test_deprivatization_ships_inputs_instead_of_weights_when_they_are_smaller(tmp_path):
    # 2 GAN steps of 8 per round: 16 inputs of 8x8 (4 KiB) against G's ~66 KiB of weights
    cfg = small_config(tmp_path, "strategy=mekd", *SMALL, "mekd.gan.steps=4", "mekd.gan.batch_size=8", devices=3)
    grid = InProcessGrid(3)
    strategy, reports = _start(cfg, grid, rounds=5)
    for t in _replies(grid):
        down = _request(t)
        phase_round = down.server_round
        if phase_round in (2, 3):  # deprivatization
            assert down.generator_weights is None and down.query.source == "inputs"
            assert down.query_inputs.shape == (16, 1, 8, 8)
            assert _answers(t).answers.shape == (16, 10)
        if phase_round == 4:  # distillation needs G itself (the mapping-emulation loss)
            assert down.generator_weights is not None and down.query_inputs is None
    assert reports[1].metrics["gan_steps"] == 2 and not any(r.failures for r in reports)


def test_same_seed_same_generator_and_student_whatever_the_global_rng(tmp_path):
    """Dropout in D and the student draw from the run's seed, not from torch's global state
    (which earlier runs in the same process, e.g. under `hetkd compare`, have moved)."""
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        cfg = small_config(tmp_path / str(global_seed), "strategy=mekd", *SMALL, devices=3)
        strategy, reports = _start(cfg, InProcessGrid(3), rounds=5)
        results.append((strategy.generator.state_dict(), reports[-1].metrics["student_accuracy"]))
    (g1, acc1), (g2, acc2) = results
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and acc1 == acc2


class _LastFirstGrid(InProcessGrid):
    """Replies arrive in the reverse of the order they were sent, as Ray may deliver them."""

    def send_and_receive(self, messages, *, timeout=None):
        return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))


def test_the_order_replies_arrive_in_changes_nothing(tmp_path):
    """Floating-point sums depend on their order, and G's training amplifies the last bit:
    the server takes the answers in device order, so a run does not depend on which device
    Ray finishes first."""
    runs = []
    for grid in (InProcessGrid(3), _LastFirstGrid(3)):
        cfg = small_config(tmp_path, "strategy=mekd", *SMALL, devices=3)
        strategy, reports = _start(cfg, grid, rounds=5)
        assert not any(r.failures for r in reports)
        runs.append((strategy, [r.metrics for r in reports]))
    (a, metrics_a), (b, metrics_b) = runs
    for module_a, module_b in ((a.generator, b.generator), (a.student, b.student)):
        state_a, state_b = module_a.state_dict(), module_b.state_dict()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(a.targets.common, b.targets.common)
    assert [m.get("student_accuracy") for m in metrics_a] == [m.get("student_accuracy") for m in metrics_b]


def test_a_device_that_lost_the_generator_says_so_and_is_sent_it_again(tmp_path):
    from hetkd.clients.handlers import GENERATOR_STATE_KEY, GENERATOR_VERSION_STATE_KEY

    cfg = small_config(tmp_path, "strategy=mekd", *SMALL, "num-server-rounds=6", devices=3)
    grid = InProcessGrid(3)
    node = grid.node_ids[0]

    def forget(report):
        if report.round == 4:  # it acknowledged the frozen G in round 4; now it loses it (a restart)
            for key in (GENERATOR_STATE_KEY, GENERATOR_VERSION_STATE_KEY):
                del grid.contexts[node].state[key]

    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy.start(grid=grid, num_rounds=6, on_round_end=lambda r: (reports.append(r), forget(r)))
    assert [f["device"] for f in reports[4].failures] == [0]
    assert "generator version" in reports[4].failures[0]["reason"]
    resent = [t for t in _replies(grid) if t.message.metadata.dst_node_id == node
              and _request(t).server_round == 6][0]
    assert _request(resent).generator_weights is not None and not resent.reply.has_error()
    assert not reports[5].failures


def test_query_specs_reject_bad_values_by_name():
    with pytest.raises(ValueError, match="'source': unknown value 'disk'"):
        QuerySpec("disk", 0, 10)
    with pytest.raises(ValueError, match="count >= 1"):
        QuerySpec("reference", 0, 0)
    spec = QuerySpec("reference", 3, 50)
    request = P.EnsembleDistill(server_round=1, kd=EnsembleSettings().kd_term(), loss=MEKDSettings().distill.loss(),
                                response="soft", answer_model="private", precision="float16", query=spec)
    assert P.EnsembleDistill.from_record(request.to_record()).query == spec  # the spec survives the wire
    with pytest.raises(ValueError, match="reference set has 20"):
        resolve_queries(spec, reference_inputs=_public(20))
    with pytest.raises(ValueError, match="generator's weights"):
        resolve_queries(QuerySpec("generator", 0, 8), generator=None)
