"""``keep_experts`` in a merge recipe (:mod:`splice.expert_subset`) on every MoE family whose
router the specs describe per expert, against transformers' own modules.

Tiny models (``test_collapse_families.build``: routers sharpened, selection biases not zero,
DeepSeek-V3 with two expert groups, a dense layer and shared experts where the family has them;
Llama 4's and Gemma 4's own test builds: MoE layers between dense ones, an MoE block beside
the MLP):

- the reference of a pruned layer is built here by hand on transformers' in-memory model: every
  tensor of the layer's routed-expert block (not the shared experts) indexed by the kept experts
  along its one axis of the expert count, loaded into transformers' model of a config with that
  count; the written model loads with no missing or unexpected key and has its logits;
- every expert kept in a permuted order (within its group where the family groups experts)
  changes no logit;
- a linear merge of two models with an expert subset writes, as expert ``j``, the weighted sum of
  the sources' expert ``keep[j]``, and the router's rows of the kept experts (a formula on the
  stored tensors, read per expert where a family stores them packed);
- bad subsets are refused in one line each, before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import families
import family_checks as fc
import pytest
import test_collapse_families as cf
import torch

from splice import open_checkpoint
from splice.arch import ArchSpec
from splice.errors import SpliceError
from splice.merge import run

torch.set_num_threads(1)
E = cf.E
FAMILIES = [
    f for f in [*cf.FORM, "llama4_text", "gemma4_text"] if ArchSpec.load(f).experts.per_expert
]


def build_moe(family: str, folder: Path, seed: int, **overrides: Any) -> Path:
    """A tiny random MoE of ``family``: collapse's builds (routers sharpened, selection biases
    not zero), Llama 4's and Gemma 4's own test builds (tests/families.py, test_gemma4.py)."""
    if family == "gemma4_text":
        import test_gemma4

        return test_gemma4.build_text(folder, "moe", seed)
    if family == "llama4_text":
        return families.build(family, folder, seed=seed)
    if family == "deepseek_v2":  # collapse's build routes every token to all 4 experts
        overrides.setdefault("num_experts_per_tok", 2)
    return cf.build(family, folder, same=False, seed=seed, **overrides)


def _model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    with fc.quiet():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _logits(model: Any) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 14, 3, 22, 7, 11, 30, 2, 17, 8]])
    with torch.no_grad():
        return model(ids).logits


def _moe_layers(model: Any) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if _block(layer) is not None]


#: where a layer's routed experts and router live, by family (Gemma 4: beside its MLP)
MOE_BLOCK = ("mlp.", "block_sparse_moe.", "feed_forward.", "experts.", "router.")


def _block(layer: Any) -> Any:
    """A decoder layer's module holding its routed experts, or None."""
    for block in (
        layer,
        *(getattr(layer, n, None) for n in ("mlp", "block_sparse_moe", "feed_forward")),
    ):
        if block is not None and isinstance(getattr(block, "experts", None), torch.nn.Module):
            return block
    return None


def _reference(source: Any, keep: dict[int, list[int]], one_group: bool = False) -> Any:
    """transformers' model of ``len(keep[i])`` experts whose layer ``i`` keeps ``keep[i]``,
    made by indexing the source model's tensors by hand (``one_group``: expert groups off)."""
    from transformers import AutoModelForCausalLM

    k = len(next(iter(keep.values())))
    cfg = source.config.__class__.from_dict(source.config.to_dict())
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        if hasattr(cfg, key):
            setattr(cfg, key, k)
    if one_group:
        cfg.n_group = cfg.topk_group = 1
    state = {}
    for name, t in source.state_dict().items():
        layer = next((i for i in keep if name.startswith(f"model.layers.{i}.")), None)
        if layer is not None and ".shared_expert" not in name and E in t.shape:
            in_block = name.split(f"model.layers.{layer}.", 1)[1]
            if in_block.startswith(MOE_BLOCK):
                axis = list(t.shape).index(E)
                t = t.index_select(axis, torch.tensor(keep[layer]))
        state[name] = t
    with fc.quiet():
        ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    ref.load_state_dict(state, strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("keep_experts")


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, work) -> dict[str, Any]:
    family = request.param
    if not families.known(family):
        pytest.skip(f"transformers has no {family!r}")
    a = build_moe(family, work / family / "a", seed=1)
    b = build_moe(family, work / family / "b", seed=2)
    source = _model(a)
    return {"family": family, "a": a, "b": b, "model": source, "moe": _moe_layers(source)}


def _keep(fam: dict[str, Any], kept: list[int]) -> list[list[int] | None]:
    n = len(fam["model"].model.layers)
    return [list(kept) if i in fam["moe"] else None for i in range(n)]


class _Tensors:
    """A model's tensors by name, per expert where the family stores them packed (splice's
    views of the stored bytes)."""

    def __init__(self, folder: Path) -> None:
        self.ckpt = open_checkpoint(folder)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.ckpt.load(name, dtype="float32")


def _write(fam: dict[str, Any], out: Path, keep: list[Any], **recipe: Any) -> Path:
    body = recipe or {"merge_method": "passthrough", "models": [{"model": str(fam["a"])}]}
    with fc.quiet():
        run({**body, "keep_experts": keep, "dtype": "float32"}, out)
    return out


def test_a_subset_is_transformers_model_of_the_kept_experts(fam, work):
    keep = _keep(fam, [3, 0])
    out = _write(fam, work / fam["family"] / "pruned", keep)
    got = _model(out)
    groups = fam["family"] == "deepseek_v3"  # 2 experts cannot fill 2 groups of 2 or more
    ref = _reference(fam["model"], {i: k for i, k in enumerate(keep) if k is not None}, groups)
    torch.testing.assert_close(_logits(got), _logits(ref), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(_logits(got), _logits(fam["model"]), atol=1e-3)
    cfg = fc.read_config(out)
    assert ArchSpec.load(fam["family"]).num_experts(cfg) == len(keep[fam["moe"][0]])


def test_every_expert_in_another_order_changes_no_logit(fam, work):
    order = [1, 0, 3, 2] if fam["family"] == "deepseek_v3" else [3, 1, 0, 2]  # v3: groups stay
    out = _write(fam, work / fam["family"] / "permuted", _keep(fam, order))
    torch.testing.assert_close(_logits(_model(out)), _logits(fam["model"]), atol=2e-5, rtol=1e-4)


def test_a_merge_with_a_subset_merges_the_kept_experts(fam, work):
    spec = ArchSpec.load(fam["family"])
    kept = [2, 1, 3] if fam["family"] != "deepseek_v3" else [0, 1, 2, 3]
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(fam["a"]), "parameters": {"weight": 0.25}},
            {"model": str(fam["b"]), "parameters": {"weight": 0.75}},
        ],
    }
    out = _write(fam, work / fam["family"] / "linear", _keep(fam, kept), **recipe)
    got, a, b = (_Tensors(p) for p in (out, fam["a"], fam["b"]))
    layer = fam["moe"][-1]
    kind = spec.experts.tensors[0]
    for j, e in enumerate(kept):
        name = spec.layer_name(layer, kind, j)
        source = spec.layer_name(layer, kind, e)
        torch.testing.assert_close(got[name], 0.25 * a[source] + 0.75 * b[source])
    router = next(k for k in spec.experts.per_expert if k.endswith(".weight"))
    name = spec.layer_name(layer, router)
    want = (0.25 * a[name] + 0.75 * b[name])[kept]
    torch.testing.assert_close(got[name], want)
    assert not any(spec.parse(n).expert == len(kept) for n in got.ckpt.tensors)


def test_deepseek_v3_groups_stay_or_go(tmp_path):
    if not families.known("deepseek_v3"):
        pytest.skip("no deepseek_v3")
    src = cf.build("deepseek_v3", tmp_path / "src", same=False, seed=1)
    n = cf.config("deepseek_v3").num_hidden_layers
    keep = [None] + [[0, 1, 2, 3]] * (n - 1)
    with fc.quiet():
        p = run({"merge_method": "passthrough", "models": [{"model": str(src)}],
                 "keep_experts": keep}, tmp_path / "kept")  # fmt: skip
    assert fc.read_config(tmp_path / "kept")["n_group"] == 2
    keep = [None] + [[0, 2, 1, 3]] * (n - 1)  # groups out of order
    with fc.quiet():
        run({"merge_method": "passthrough", "models": [{"model": str(src)}],
             "keep_experts": keep}, tmp_path / "mixed")  # fmt: skip
    cfg = fc.read_config(tmp_path / "mixed")
    assert (cfg["n_group"], cfg["topk_group"]) == (1, 1)
    del p


BAD = [
    (lambda n, moe: [[0, 1] if i in moe else None for i in range(n - 1)], "entries for an output"),
    (lambda n, moe: [[0, 1] if i in moe else [0] for i in range(n)], "has no routed experts"),
    (lambda n, moe: [None] * n, "has routed experts"),
    (lambda n, moe: [[0, 9] if i in moe else None for i in range(n)], "is not an expert"),
    (lambda n, moe: [[1, 1] if i in moe else None for i in range(n)], "listed twice"),
    (lambda n, moe: [[0] if i in moe else None for i in range(n)], "fewer than the 2"),
    (
        lambda n, moe: [
            ([0, 1] if i == moe[0] else [0, 1, 2]) if i in moe else None for i in range(n)
        ],
        "the same number of experts",
    ),
]


@pytest.mark.parametrize(("keep", "message"), BAD)
def test_bad_subsets_are_refused_before_writing(tmp_path, keep, message):
    src = cf.build("qwen3_moe", tmp_path / "src", same=False, seed=1)
    n = cf.config("qwen3_moe").num_hidden_layers
    out = tmp_path / "out"
    with pytest.raises(SpliceError, match=message):
        run({"merge_method": "passthrough", "models": [{"model": str(src)}],
             "keep_experts": keep(n, [1, 2, 3])}, out)  # fmt: skip
    assert not out.exists()


def test_a_dense_model_has_no_experts_to_keep(tmp_path):
    src = families.build("llama", tmp_path / "src")
    with pytest.raises(SpliceError, match="has no routed experts"):
        run({"merge_method": "passthrough", "models": [{"model": str(src)}],
             "keep_experts": [[0]] * 4}, tmp_path / "out")  # fmt: skip


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
_entry = st.one_of(
    st.none(),
    st.lists(
        st.one_of(st.integers(-2, 6), st.booleans(), st.floats(), st.text(max_size=2)), max_size=5
    ),
    st.integers(),
    st.text(max_size=3),
)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return cf.build("qwen3_moe", tmp_path_factory.mktemp("fuzz") / "src", same=False, seed=1)


@hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
@hypothesis.given(keep=st.one_of(st.lists(_entry, max_size=6), _entry))
def test_any_keep_experts_plans_or_is_refused_in_one_line(qwen, keep):
    """Whatever ``keep_experts`` holds, planning it either refuses with a SpliceError (a line
    per problem, each naming keep_experts) or keeps the same count in every MoE layer."""
    from splice.merge.runner import plan

    recipe = {"merge_method": "passthrough", "models": [{"model": str(qwen)}], "keep_experts": keep}
    try:
        p = plan(recipe)
    except SpliceError as e:
        assert all("keep_experts" in line for line in str(e).splitlines()), str(e)
        return
    k = ArchSpec.load("qwen3_moe").num_experts(p.config)
    assert [len(v) for v in keep if v is not None] == [k] * 3 if keep is not None else k == 4
