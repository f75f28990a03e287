"""Merging works on real skills: TIES and DARE-TIES of the zoo's two specialists carry each
specialist's skill to the task the other one was never trained for (held-out items, lm-eval)."""

from __future__ import annotations

import pytest

from splice.merge import merge_into


def recipe(zoo, method: str, weights: tuple[float, float], density: float, **params) -> dict:
    return {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "models": [
            {"model": str(zoo / name), "parameters": {"weight": w, "density": density}}
            for name, w in zip(("math", "lang"), weights, strict=True)
        ],
        "parameters": params,
        "seed": 0,
    }


@pytest.mark.slow
def test_ties_and_dare_ties_combine_the_specialists(zoo):
    from splice.modeling import load_causal_lm
    from splice.zoo import evaluate

    models = {n: zoo / n for n in ("math", "lang")}
    for name, r in {
        "ties": recipe(zoo, "ties", (1.0, 1.0), 0.7, normalize=False),
        "dare_ties": recipe(zoo, "dare_ties", (1.0, 0.8), 0.9),
    }.items():
        model = load_causal_lm(zoo / "base")
        merge_into(model, r)
        models[name] = model  # type: ignore[assignment]
    s = evaluate(models, ["zoo_math", "zoo_lang"], zoo=zoo, show_progress=False)
    for merged in ("ties", "dare_ties"):
        assert s[merged]["zoo_math"] >= s["lang"]["zoo_math"] + 0.10, s
        assert s[merged]["zoo_lang"] >= s["math"]["zoo_lang"] + 0.10, s
