"""splice's batched greedy generator (splice.generate) and its place in lm-eval's flow
(splice.lmeval: FastHFLM, LmEvalScorer's default): item by item what lm-eval's own
HFLM.generate_until returns, on the zoo's generation tasks, for the zoo's models and a merge."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")

from splice.errors import SpliceWarning  # noqa: E402
from splice.generate import GenRequest, batches, generate_greedy, shared_prefix  # noqa: E402

LIMIT = 64
STOPS = ("<eos>", "?", ".")


@pytest.fixture(scope="module")
def models(zoo):
    """The zoo's base, math and lang (float32), and their linear 0.5/0.5 merge of math and
    lang, with the (shared) tokenizer."""
    from transformers import AutoTokenizer

    from splice.modeling import load_causal_lm

    out = {name: load_causal_lm(zoo / name) for name in ("base", "math", "lang")}
    merge = copy.deepcopy(out["math"])
    with torch.no_grad():
        for p, q in zip(merge.parameters(), out["lang"].parameters(), strict=True):
            p.mul_(0.5).add_(q, alpha=0.5)
    out["math+lang linear"] = merge
    return out, AutoTokenizer.from_pretrained(zoo / "math")


@pytest.fixture(scope="module")
def scorer(zoo, models):
    from splice.lmeval import LmEvalScorer

    with LmEvalScorer(
        ["zoo_math_gen", "zoo_lang_gen"], tokenizer=models[1], zoo_tasks=zoo / "tasks"
    ) as s:
        yield s


def items(lm, task_dict, limit=LIMIT) -> dict[tuple[str, int], tuple[str, object, float]]:
    """lm-eval's evaluate with log_samples: per (task, doc) the generated string, the
    filtered answer and exact_match."""
    from lm_eval.evaluator import evaluate

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        res = evaluate(
            lm, task_dict, limit=limit, log_samples=True, bootstrap_iters=0, verbosity="ERROR"
        )
    return {
        (task, s["doc_id"]): (s["resps"][0][0], s["filtered_resps"][0], float(s["exact_match"]))
        for task, samples in res["samples"].items()
        for s in samples
    }


def hflm(cls, model, tok, **attrs):
    with contextlib.redirect_stderr(io.StringIO()):
        lm = cls(pretrained=model, tokenizer=tok, batch_size=32)
    for k, v in attrs.items():
        setattr(lm, k, v)
    return lm


@pytest.mark.parametrize("name", ["base", "math", "lang", "math+lang linear"])
def test_items_match_lm_evals_own_generation(models, scorer, name):
    from lm_eval.models.huggingface import HFLM

    from splice.lmeval import fast_hflm

    model, tok = models[0][name], models[1]
    stock = items(hflm(HFLM, model, tok), scorer.task_dict)
    fast_lm = hflm(fast_hflm(), model, tok)
    fast = items(fast_lm, scorer.task_dict)
    assert len(stock) == 2 * LIMIT
    assert fast == stock
    assert fast_lm.notes == set()  # every request took the fast path
    assert len({v[0] for v in stock.values()}) > 10  # the model says many things
    if name == "lang":  # small batches: several of them, rows dropped as they end
        small = items(hflm(fast_hflm(), model, tok, generation_rows=5), scorer.task_dict, 24)
        assert small == {k: v for k, v in stock.items() if k[1] < 24}


# ---- the generator on hand-built cases -------------------------------------------------------


def reference(model, tok, req: GenRequest, eos=()) -> list[int]:
    """Greedy, one prompt, no cache, no padding; a stop string found as lm-eval's stopping
    criterion finds it (the last len(encode(stop)) + 2 new tokens decoded)."""
    ids, new = list(req.ids), []
    with torch.no_grad():
        while len(new) < req.max_new_tokens:
            tok_id = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(tok_id)
            if tok_id in eos:
                break
            windows = [len(tok.encode(u, add_special_tokens=False)) + 2 for u in req.until]
            if any(u in tok.decode(new[-w:]) for u, w in zip(req.until, windows, strict=True)):
                break
    return new


@pytest.fixture(scope="module")
def prompts(zoo, models):
    """Prompts of many lengths: zoo questions, some cut short."""
    tok = models[1]
    rows = []
    for name in ("zoo_math", "zoo_lang"):
        lines = (zoo / "tasks" / f"{name}.jsonl").read_text().splitlines()[:6]
        rows += [json.loads(line)["prompt"] for line in lines]
    ids = [tok.encode(p) for p in rows]
    return ids + [p[: max(2, len(p) // 2)] for p in ids[::3]]


def test_batched_padded_rows_are_one_by_one_greedy(models, prompts):
    model, tok = models[0]["lang"], models[1]
    reqs = [GenRequest(p, 6, STOPS) for p in prompts]
    assert len({len(p) for p in prompts}) > 5
    want = [reference(model, tok, r, eos=(2,)) for r in reqs]
    for size in (5, 64):
        got = generate_greedy(model, reqs, tokenizer=tok, eos_token_ids=[2], batch_size=size)
        assert got == want, size
    # some rows ended at a stop string before max_new_tokens
    assert any(len(w) < 6 for w in want)


def test_max_new_tokens_per_request(models, prompts):
    model, tok = models[0]["math"], models[1]
    reqs = [GenRequest(p, n) for p, n in zip(prompts, [1, 3, 9, 0, 2] * 4, strict=False)]
    got = generate_greedy(model, reqs, tokenizer=tok, batch_size=4)
    assert [len(g) for g in got] == [r.max_new_tokens for r in reqs]
    assert got == [reference(model, tok, r) for r in reqs]


def test_mixed_stops_and_lengths_share_a_batch(models, prompts):
    model, tok = models[0]["math+lang linear"], models[1]
    settings = [(6, STOPS), (4, ("?",)), (8, ()), (5, (" ",)), (7, ("nope", "."))]
    reqs = [GenRequest(p, *settings[i % 5]) for i, p in enumerate(prompts)]
    got = generate_greedy(model, reqs, tokenizer=tok, batch_size=32)
    assert got == [reference(model, tok, r) for r in reqs]


def test_eos_ends_a_row(models, prompts):
    model, tok = models[0]["base"], models[1]
    free = reference(model, tok, GenRequest(prompts[0], 8))
    eos = free[2]
    got = generate_greedy(model, [GenRequest(prompts[0], 8)], eos_token_ids=[eos])
    assert got == [free[: free.index(eos) + 1]]


def test_a_shared_prefix_runs_once(models, zoo):
    model, tok = models[0]["math"], models[1]
    lines = (zoo / "tasks" / "zoo_math.jsonl").read_text().splitlines()[:30]
    prompts = [tok.encode(json.loads(line)["prompt"]) for line in lines]
    prefix = shared_prefix(prompts)
    assert prefix >= 5 and (len(prompts) - 1) * prefix >= 128
    reqs = [GenRequest(p, 6, STOPS) for p in prompts]
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        shared = generate_greedy(model, reqs, tokenizer=tok, eos_token_ids=[2], batch_size=32)
    finally:
        hook.remove()
    assert shapes[:2] == [(1, prefix), (30, len(prompts[0]) - prefix)]
    plain = generate_greedy(
        model, reqs, tokenizer=tok, eos_token_ids=[2], batch_size=32, share_prefix=False
    )
    assert shared == plain
    assert shared[:4] == [reference(model, tok, r, eos=(2,)) for r in reqs[:4]]


def test_shared_prefix_and_batches():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3]]) == 2  # a token of its own
    assert shared_prefix([[1, 2], [3, 4]]) == 0
    reqs = [GenRequest([1] * n, m) for n, m in [(3, 2), (9, 1), (5, 4), (9, 1), (2, 2)]]
    assert batches(reqs, range(5), 2) == [[1, 3], [2, 0], [4]]
    # rows x (longest prompt + most new tokens) <= 25: 2 x 10, then 2 x (5 + 4)...
    assert batches(reqs, range(5), 8, max_batch_tokens=25) == [[1, 3], [2, 0], [4]]
    assert batches(reqs, [0, 4], 8, max_batch_tokens=1) == [[0], [4]]  # a row at least
    with pytest.raises(ValueError, match="tokenizer"):
        generate_greedy(torch.nn.Linear(1, 1), [GenRequest([1], 2, ("x",))])


# ---- in lm-eval's flow: the scorer, fallbacks, evolve ----------------------------------------


def test_sampling_goes_to_lm_evals_path_with_a_warning(models, zoo, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from splice.lmeval import LmEvalScorer, fast_hflm

    model, tok = models[0]["math"], models[1]
    ctx = "question : what is 1 plus 2 ? answer :"
    greedy = {"until": ["."], "do_sample": False, "max_gen_toks": 4}
    sampled = {"until": ["."], "do_sample": True, "temperature": 1.0, "max_gen_toks": 4}
    reqs = [Instance("generate_until", {}, (ctx, kw), i) for i, kw in enumerate([greedy, sampled])]
    lm = hflm(fast_hflm(), model, tok)
    out = lm.generate_until(reqs, True)
    assert out[0] == HFLM.generate_until(hflm(HFLM, model, tok), reqs[:1], True)[0]
    assert isinstance(out[1], str)
    assert any("do_sample: true" in n and "lm-eval's own path" in n for n in lm.notes)

    task = (zoo / "tasks" / "zoo_math_gen.yaml").read_text()
    data = (zoo / "tasks" / "zoo_math.jsonl").resolve()
    task = task.replace("include: _zoo_template_yaml\n", "dataset_path: json\n")
    task = task.replace('"zoo_math.jsonl"', json.dumps(str(data)))
    task = task.replace("task: zoo_math_gen", "task: sampled_gen").replace("tag: [zoo]\n", "")
    task = task.replace("do_sample: false", "do_sample: true\n  temperature: 1.0")
    (tmp_path / "sampled.yaml").write_text(task)
    with (
        LmEvalScorer(["sampled_gen"], tokenizer=tok, task_dirs=[tmp_path]) as s,
        pytest.warns(SpliceWarning, match="sampled_gen: .*own path.*do_sample: true"),
    ):
        s.score(model, limit=4)


def test_a_generation_config_that_changes_greedy_keeps_lm_evals_path(models, scorer):
    from lm_eval.models.huggingface import HFLM

    from splice.lmeval import fast_hflm

    model, tok = copy.deepcopy(models[0]["math"]), models[1]
    model.generation_config.repetition_penalty = 1.5
    lm = hflm(fast_hflm(), model, tok)
    assert items(lm, scorer.task_dict) == items(hflm(HFLM, model, tok), scorer.task_dict)
    assert any("repetition_penalty" in n for n in lm.notes)


def test_scorer_default_and_opt_out(models, zoo):
    from lm_eval import utils
    from lm_eval.models.huggingface import HFLM

    from splice.lmeval import LmEvalScorer, fast_hflm

    model, tok = models[0]["math"], models[1]
    original = utils.apply_template  # (compiled once already where another scorer is open)
    scores = {}
    for fast in (True, False):
        with LmEvalScorer(
            ["zoo_math_gen"], tokenizer=tok, zoo_tasks=zoo / "tasks", fast_generation=fast
        ) as s:
            assert getattr(utils.apply_template, "compiled_once", False)
            scores[fast] = s.score(model, limit=LIMIT)
            assert type(s._lm) is (fast_hflm() if fast else HFLM)
        assert utils.apply_template is original
    assert scores[True] == scores[False]


def test_templates_compiled_once_render_the_same(monkeypatch):
    from lm_eval import utils

    from splice.lmeval import compiled_templates

    def original(template, doc):  # lm-eval's own (another open scorer may have replaced it)
        return utils.env.from_string(template).render(**doc)

    monkeypatch.setattr(utils, "apply_template", original)
    doc = {"a": 1, "b": "x y"}
    want = original("{{a}} - {{b}}", doc)
    with compiled_templates():
        cached = utils.apply_template
        assert cached is not original
        with compiled_templates():  # nested: changes nothing
            assert utils.apply_template is cached
        assert [cached("{{a}} - {{b}}", doc) for _ in range(2)] == [want] * 2
    assert utils.apply_template is original


def test_a_data_flow_path_module(models, scorer, zoo):
    """evolve's data-flow candidates: a donor module running other modules' layers, one
    repeated (each step its own cache slot)."""
    from lm_eval.models.huggingface import HFLM

    from splice.evolve.dataflow import PathModels
    from splice.lmeval import fast_hflm
    from splice.merge import MergeOptions
    from splice.resident import ResidentCheckpoint

    math, lang = str(zoo / "math"), str(zoo / "lang")
    sources = {m: ResidentCheckpoint(m) for m in (math, lang)}
    paths = PathModels(sources, math, MergeOptions(show_progress=False), "float32")
    steps = [{"model": math, "layer": i} for i in range(6)]
    steps += [{"model": lang, "layer": i, "scale": 1.1} for i in (4, 5, 6, 7)]
    module = paths.build([*steps, {"model": math, "layer": 3, "scale": 0.9}])
    tok = models[1]
    lm = hflm(fast_hflm(), module, tok)
    assert items(lm, scorer.task_dict, 24) == items(hflm(HFLM, module, tok), scorer.task_dict, 24)
    assert lm.notes == set()


def test_evolve_fitness_on_a_generation_task(models, zoo):
    from splice.evolve.config import LmEvalArgs, TaskSpec
    from splice.evolve.scorer import TaskScorer
    from splice.lmeval import LmEvalScorer, fast_hflm

    model, tok = models[0]["math+lang linear"], models[1]
    spec = TaskSpec(name="zoo_math_gen", metric="exact_match,strip")
    with TaskScorer([spec], tokenizer=tok, args=LmEvalArgs(limit=32), zoo=zoo) as ts:
        scores = ts.score(model)
        assert isinstance(ts.lm._lm, fast_hflm())
        fitness = ts.fitness(scores)
    with LmEvalScorer(
        ["zoo_math_gen"], tokenizer=tok, zoo_tasks=zoo / "tasks", fast_generation=False
    ) as s:
        want = s.score(model, limit=32)["zoo_math_gen"]["exact_match,strip"]
    assert scores == {"zoo_math_gen:exact_match,strip": want}
    assert fitness == want and 0 < want < 1
