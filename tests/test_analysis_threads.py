"""CPU threads per tensor size: one thread below ``SMALL_NUMEL`` elements, torch's setting above,
``threads=`` (the CLI's ``--threads``) for every tensor; the setting is restored afterwards."""

from __future__ import annotations

import pytest
import torch

from splice.analysis.common import Timer, metric_values, pairwise
from splice.analysis.metrics import Metric
from splice.threads import SMALL_NUMEL, threads_for


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(old)


def spy() -> tuple[Metric, list[int]]:
    """A metric that records the thread count its features and comparison ran on."""
    seen: list[int] = []

    def features(t: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return t.reshape(-1)

    def compare(a: torch.Tensor, b: torch.Tensor) -> float:
        seen.append(torch.get_num_threads())
        return float(a @ b)

    return Metric("spy", "threads seen", features, compare, lambda shape: True), seen


def test_threads_for_small_large_and_override(two_threads):
    with threads_for(SMALL_NUMEL - 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads_for(SMALL_NUMEL):
        assert torch.get_num_threads() == 2
    with threads_for(10, threads=3):
        assert torch.get_num_threads() == 3
    with pytest.raises(ValueError), threads_for(10):
        raise ValueError("restored on errors too")
    assert torch.get_num_threads() == 2


def test_metrics_run_on_the_threads_of_their_size(two_threads):
    m, seen = spy()
    small = torch.ones(96, 192)
    values = metric_values([m], small, small.clone(), None, Timer())
    assert values["spy"][0] == small.numel()
    assert seen and set(seen) == {1}
    seen.clear()
    large = torch.ones(SMALL_NUMEL)
    metric_values([m], large, large, None, Timer())
    assert set(seen) == {2}
    seen.clear()
    metric_values([m], small, small, None, Timer(), threads=2)
    assert set(seen) == {2}
    seen.clear()
    values, _ = pairwise(m, [small, 2 * small], None, Timer())
    assert values[0, 1] == 2 * small.numel() and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_activations_of_a_small_model_run_on_one_thread(
    two_threads, tiny_models, tmp_path, monkeypatch
):
    import warnings

    import splice.calib.layer_io as acts
    from splice.analysis.activations import analyze_activations

    seen: list[int] = []
    real = acts.layer_statistics

    def spy_stats(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(acts, "layer_statistics", spy_stats)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(400)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-ties on a random model
        analyze_activations(tiny_models["llama"], text, seq_len=8, max_samples=2)
        analyze_activations(tiny_models["llama"], text, seq_len=8, max_samples=2, threads=2)
    assert seen == [1, 2] and torch.get_num_threads() == 2
