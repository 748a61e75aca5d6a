"""Training checkpoints load with weights_only=True, and the classifier optimizer layout they assume is checked."""

from __future__ import annotations

import pytest
import torch

from oclear_ext.nn import ShardedMarginClassifier
from oclear_ext.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


class Pickled:  # not a tensor, number, string or container: weights_only refuses to unpickle it
    pass


def parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    classifier = ShardedMarginClassifier(10, 4, scale=8.0)
    optimizer = torch.optim.AdamW(model.parameters())
    classifier_optimizer = torch.optim.AdamW([classifier.weight])
    loss = classifier(model(torch.randn(6, 4)), torch.arange(6))
    loss.backward()
    optimizer.step()
    classifier_optimizer.step()
    return dict(model=model, classifier=classifier, optimizer=optimizer, classifier_optimizer=classifier_optimizer,
                schedulers=[], generators={})


def test_a_checkpoint_round_trips_with_weights_only(tmp_path):
    saved = parts(0)
    save_checkpoint(tmp_path, 3, position={"step": 3}, config={"margin": (1.0, 0.0, 0.4)}, **saved)
    restored = parts(1)
    position = load_checkpoint(tmp_path, device=torch.device("cpu"), **restored)
    assert position == {"step": 3}
    assert torch.equal(restored["classifier"].weight, saved["classifier"].weight)
    assert torch.equal(restored["model"].weight, saved["model"].weight)
    exp_avg = restored["classifier_optimizer"].state[restored["classifier"].weight]["exp_avg"]
    assert torch.equal(exp_avg, saved["classifier_optimizer"].state[saved["classifier"].weight]["exp_avg"])


def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path):
    saved = parts(0)
    save_checkpoint(tmp_path, 1, position={"step": 1}, config={}, **saved)
    state_file = latest_checkpoint(tmp_path) / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["position"] = Pickled()
    torch.save(state, state_file)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_checkpoint(tmp_path, device=torch.device("cpu"), **parts(1))


def test_a_classifier_optimizer_with_other_parameters_is_refused(tmp_path):
    saved = parts(0)
    saved["classifier_optimizer"] = torch.optim.SGD([saved["classifier"].weight, torch.nn.Parameter(torch.ones(3))], lr=0.1)
    with pytest.raises(ValueError, match="must hold exactly the classifier weight .* got 2 parameter"):
        save_checkpoint(tmp_path, 1, position={}, config={}, **saved)
