"""The round loop's rules at the function level (no Ray): which client updates count, when a
federation has failed or diverged, and which config a saved run may resume with."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from cxrfl_ray.config import ConfigError, build_config
from cxrfl_ray.fl.rounds import (Failure, FailedRounds, FederationFailed, error_reason, evaluate_global,
                                 nonfinite_update)
from cxrfl_ray.fl.state import check_resume, load_state, save_state
from cxrfl_ray.tasks.training import DivergedError


def update(loss: float, weight: float) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"conv.weight": torch.full((2, 3), weight), "step": torch.tensor(3)}),
                       "metrics": MetricRecord({"cid": 0, "train_loss": loss, "num-examples": 8})})


def test_a_nonfinite_client_update_is_named_and_a_finite_one_passes():
    assert nonfinite_update(update(0.5, 0.1)) is None
    assert nonfinite_update(update(float("inf"), 0.1)) == "train loss inf"
    assert nonfinite_update(update(float("nan"), 0.1)) == "train loss nan"
    assert nonfinite_update(update(0.5, float("nan"))) == "nan in conv.weight"
    assert nonfinite_update(update(0.5, float("-inf"))) == "inf in conv.weight"


def test_the_client_exception_is_found_in_flowers_error_reason():
    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientActor.run_shared()\x1b[39m "
              "(pid=1, ip=1.2.3.4)\n  File \"/x/client.py\", line 177, in train\n    raise InjectedClientFailure(...)\n"
              "cxrfl_ray.fl.client.InjectedClientFailure: injected failure of client 0 in round 1\n\n"
              "The above exception was the direct cause of the following exception:\n\n"
              "flwr.clientapp.client_app.ClientAppException: \n"
              "Exception ClientAppException occurred. Message: injected failure of client 0 in round 1'>")
    assert error_reason(reason) == "InjectedClientFailure: injected failure of client 0 in round 1"
    died = ("<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this task.\n"
            "\tclass_name: ClientActor\n\tpid: 24016\nThe actor is dead because its worker process has died. Worker "
            "exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2.'>")
    assert error_reason(died) == ("ActorDiedError: The actor died unexpectedly before finishing this task. (worker "
                                  "exit type SYSTEM_ERROR; a common cause is the OOM killer)")


def test_failed_rounds_keep_count_across_a_resume_and_fail_the_run_quoting_the_first_error():
    policy = FailedRounds(min_replies=1, max_failed_rounds=2)
    err = [Failure(0, "DatasetError: /d/shard-0.parquet: row 4 cannot be decoded"), Failure(1, "no reply")]
    assert policy.judge(1, 2, 0, err) is False  # failed, but the limit is not reached: the model stays
    assert policy.state() == {"failed_streak": 1, "first_failure": {
        "round": 1, "client": 0, "reason": "DatasetError: /d/shard-0.parquet: row 4 cannot be decoded", "diverged": False}}
    resumed = FailedRounds(min_replies=1, max_failed_rounds=2)
    resumed.restore(policy.state())  # from the saved round state
    with pytest.raises(FederationFailed) as info:
        resumed.judge(2, 2, 0, [Failure(0, "IndexError: other"), Failure(1, "IndexError: other")])
    assert str(info.value) == (
        "federation failed at round 2: 0 of 2 clients trained successfully, fewer than fl.min_replies 1; 2 rounds in "
        "a row (1-2) had fewer, fl.max_failed_rounds 2; first client error (round 1): client 0: DatasetError: "
        "/d/shard-0.parquet: row 4 cannot be decoded")
    # A successful round in between resets the count; min_replies counts successes, not replies.
    policy = FailedRounds(min_replies=2, max_failed_rounds=2)
    assert policy.judge(1, 3, 1, [Failure(2, "x")]) is False
    assert policy.judge(2, 3, 2, [Failure(0, "x")]) is True and policy.state() == {"failed_streak": 0, "first_failure": None}
    old = FailedRounds(1, 1)
    old.restore({"best": 0.5, "best_round": 2, "failures_total": 3})  # state saved before the policy: no streak
    assert (old.streak, old.first) == (0, None)


def test_a_round_where_every_update_diverged_stops_with_the_divergence_error():
    with pytest.raises(DivergedError) as info:
        FailedRounds(1, 1).judge(3, 2, 0, [Failure(0, "train loss nan", diverged=True),
                                           Failure(1, "inf in fc.weight", diverged=True)])
    assert str(info.value) == ("diverged at round 3 (train loss nan from client 0; 0 of 2 clients gave a finite "
                               "update): lower train.lr")
    assert str(Failure(1, "inf in fc.weight", diverged=True)) == "client 1: update not finite (inf in fc.weight)"


def test_a_nonfinite_global_model_or_metric_is_divergence_at_its_round():
    from flwr.serverapp.strategy import FedAdam, FedAvg

    from cxrfl_ray.tasks.classification import metrics_from_proba

    finite, fedavg = ArrayRecord({"fc.weight": torch.ones(2, 2)}), FedAvg()
    view = {("central", "val"): {"loss": 0.7, "accuracy": 0.5, "auroc_0": 0.5}}
    assert evaluate_global(4, finite, lambda: view, "accuracy", fedavg) == view
    with pytest.raises(DivergedError, match=r"^diverged at round 4 \(loss inf\): lower train.lr$"):
        evaluate_global(4, finite, lambda: {("central", "val"): {"loss": float("inf"), "accuracy": 0.3}}, "accuracy", fedavg)
    with pytest.raises(DivergedError, match=r"^diverged at round 4 \(jaccard nan\): lower train.lr$"):
        evaluate_global(4, finite, lambda: {("site", "s1"): {"loss": 0.1, "jaccard": float("nan")}}, "jaccard", fedavg)
    with pytest.raises(DivergedError, match=r"^diverged at round 1 \(non-finite model outputs for 1 of 1 images\): "
                                            r"lower train.lr$"):  # the task's own check, located at the round
        evaluate_global(1, finite, lambda: metrics_from_proba(np.array([[np.nan] * 3]), np.array([0])), "accuracy", fedavg)
    nan = ArrayRecord({"fc.weight": torch.tensor([1.0, float("nan")])})
    with pytest.raises(DivergedError, match=r"^diverged at round 2 \(nan in fc.weight\): lower train.lr$"):
        evaluate_global(2, nan, lambda: pytest.fail("a non-finite model is not evaluated"), "accuracy", fedavg)
    with pytest.raises(DivergedError, match=r"^diverged at round 2 \(nan in fc.weight\): lower train.lr or "
                                            r"fl.strategy.options.eta$"):  # the server's own step can diverge
        evaluate_global(2, nan, dict, "accuracy", FedAdam())


def fingerprinted_run(tmp_path, **train):
    cfg = build_config({"name": "r", "out_dir": str(tmp_path), "data": {"path": str(tmp_path / "data"), "size": 64},
                        "train": {"lr": 0.001, **train}, "fl": {"rounds": 4}})
    run = tmp_path / "run"
    run.mkdir(parents=True)
    cfg.save(run / "config.yaml")
    save_state(run, 2, ArrayRecord({"w": torch.zeros(3)}), object(), {"best": 0.5, "best_round": 2, "failures_total": 0}, cfg)
    return cfg, run


def edited(cfg, **sections):
    """``cfg`` with some fields changed, as an edit of the run's config.yaml would."""
    data = cfg.model_dump(mode="json")
    for section, values in sections.items():
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    return build_config(data)


def test_resume_refuses_an_edited_config_and_names_each_changed_field(tmp_path):
    cfg, run = fingerprinted_run(tmp_path)
    check_resume(run, cfg)  # unchanged: resumes
    with pytest.raises(ConfigError) as info:
        check_resume(run, edited(cfg, train={"lr": 0.01}, data={"size": 128}))
    assert str(info.value) == (f"--resume {run}: {run / 'config.yaml'} was changed after rounds ran with it "
                               f"(data.size: 64 -> 128, train.lr: 0.001 -> 0.01); restore it, or start a new run")
    with pytest.raises(ConfigError, match=r"\(model.name: 'resnet18' -> 'tiny-conv'\)"):
        check_resume(run, edited(cfg, model={"name": "tiny-conv"}))
    with pytest.raises(ConfigError, match=r"\(fl.rounds: 4 -> 2\)"):  # fewer rounds than it was started for
        check_resume(run, edited(cfg, fl={"rounds": 2}))
    check_resume(run, edited(cfg, out_dir=str(tmp_path / "moved")))  # out_dir is not used by a resume


def test_a_run_saved_before_a_config_field_existed_resumes_and_the_pictures_count_may_change(tmp_path, monkeypatch):
    """The saved fingerprint lacks tracking.pictures and partition.seed (added later): at their
    defaults they are no change; a changed partition seed still is; pictures never touch the rounds."""
    import json

    import cxrfl_ray.fl.state as state

    cfg, run = fingerprinted_run(tmp_path)
    older = cfg.model_dump(mode="json")
    del older["tracking"]["pictures"], older["partition"]["seed"]
    monkeypatch.setattr(state, "canonical_config", lambda c: json.dumps(older, sort_keys=True))
    save_state(run, 2, ArrayRecord({"w": torch.zeros(3)}), object(), {"best": 0.5, "best_round": 2}, cfg)
    monkeypatch.undo()
    check_resume(run, cfg)
    check_resume(run, edited(cfg, tracking={"pictures": 0}))
    with pytest.raises(ConfigError, match=r"\(partition.seed: None -> 3\)"):
        check_resume(run, edited(cfg, partition={"seed": 3}))


def test_resume_allows_more_rounds_and_says_so_unless_the_rate_follows_the_rounds(tmp_path, caplog):
    cfg, run = fingerprinted_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cxrfl.fl"):
        check_resume(run, edited(cfg, fl={"rounds": 6}))
    assert f"--resume {run}: fl.rounds 4 -> 6: the same run continues to round 6" in caplog.text
    cosine, run2 = fingerprinted_run(tmp_path / "c", lr_schedule="cosine")
    with pytest.raises(ConfigError, match=r"\(fl.rounds: 4 -> 6\) \(with train.lr_schedule 'cosine' the rate "
                                          r"follows all rounds: the rounds done used the old count\)"):
        check_resume(run2, edited(cosine, fl={"rounds": 6}))


def test_state_saved_before_fingerprints_resumes_with_a_warning(tmp_path, caplog):
    cfg, run = fingerprinted_run(tmp_path)
    save_state(run, 2, ArrayRecord({"w": torch.zeros(3)}), object(), {"best": 0.5, "best_round": 2, "failures_total": 0})
    with caplog.at_level(logging.WARNING, logger="cxrfl.fl"):
        check_resume(run, edited(cfg, train={"lr": 0.5}))
    assert "no config fingerprint (saved by an older version)" in caplog.text
    done, arrays, _, extra = load_state(run)
    assert done == 2 and extra == {"best": 0.5, "best_round": 2, "failures_total": 0}
    assert np.array_equal(arrays["w"].numpy(), np.zeros(3, np.float32))
