"""The activation runner and its collectors against references built without it: transformers'
``output_hidden_states`` / ``output_router_logits``, each decoder layer run by hand, formulas on
the hand-run tensors, the pre-runner ``layer_statistics`` (kept here verbatim), Algorithm R
step by step, and a live-bytes count of every tensor created while the runner runs."""

from __future__ import annotations

import copy
import math
import weakref
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from splice.calib import (
    Capture,
    Collector,
    Gram,
    LayerIO,
    NeuronStats,
    PooledMean,
    Reservoir,
    RouterCounts,
    layer_statistics,
    run,
)
from splice.errors import SpliceError

F = torch.nn.functional


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is faster than two and leaves the other core free; the
    references need no autograd."""
    before, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    yield
    torch.set_num_threads(before)
    torch.set_grad_enabled(grad)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load(tiny_models["llama"])


@pytest.fixture(scope="module")
def mixtral(tiny_models):
    return load(tiny_models["mixtral"])


def windows(n=6, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 96, (n, t), generator=g)


def right_padded(ids, seed=1):
    """A copy of ``ids`` with a random tail of each window padded (id 0), and its mask."""
    g = torch.Generator().manual_seed(seed)
    n, t = ids.shape
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return ids * mask, mask


def by_hand(model, ids):
    """Each decoder layer of a Llama / Mixtral run by hand on unpadded ``ids`` ``[B, T]``: per
    layer its input, the MLP input (post-attention norm of the mid stream) and output."""
    m = model.model
    t = ids.shape[1]
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    h = m.embed_tokens(ids)
    rot = m.rotary_emb(h, torch.arange(t)[None])
    parts = []
    with torch.no_grad():
        for layer in m.layers:
            attn = layer.self_attn(
                hidden_states=layer.input_layernorm(h),
                position_embeddings=rot,
                attention_mask=causal,
            )[0]
            mid = h + attn
            x = layer.post_attention_layernorm(mid)
            y = layer.mlp(x)
            parts.append({"input": h, "mlp_in": x, "mlp_out": y, "output": mid + y})
            h = mid + y
        # the hand run is the model's own forward
        model.config.tie_last_hidden_states = False
        hs = model(ids, output_hidden_states=True).hidden_states
    for i, p in enumerate(parts):
        torch.testing.assert_close(p["input"], hs[i], rtol=1e-5, atol=1e-5)
    return parts


def gram(rows):
    r = rows.double()
    return r.T @ r


# ---- Gram ---------------------------------------------------------------------------------------
def test_gram_of_layer_inputs_equals_xtx_of_output_hidden_states(llama):
    ids, mask = right_padded(windows())
    model = llama
    model.config.tie_last_hidden_states = False
    n_layers = model.config.num_hidden_layers
    ref_in = [torch.zeros(32, 32, dtype=torch.float64) for _ in range(n_layers)]
    ref_out = [torch.zeros(32, 32, dtype=torch.float64) for _ in range(n_layers)]
    with torch.no_grad():
        for w, m in zip(ids, mask, strict=True):  # each window alone, unpadded
            hs = model(w[m.bool()][None], output_hidden_states=True).hidden_states
            for i in range(n_layers):
                ref_in[i] += gram(hs[i][0])
                if i + 1 < n_layers:
                    ref_out[i] += gram(hs[i + 1][0])
    got_in, got_out = run(
        model,
        ids,
        [Gram("layer"), Gram("layer", "output", layers=range(n_layers - 1))],
        attention_mask=mask,
        batch_size=4,  # batches of 4 and 2
    )
    assert sorted(got_in) == list(range(n_layers)) and sorted(got_out) == list(range(n_layers - 1))
    for i in range(n_layers):
        assert got_in[i].tokens == int(mask.sum()) and got_in[i].xtx.dtype == torch.float64
        torch.testing.assert_close(got_in[i].xtx, ref_in[i], rtol=1e-5, atol=1e-4)
    for i in range(n_layers - 1):
        torch.testing.assert_close(got_out[i].xtx, ref_out[i], rtol=1e-5, atol=1e-4)


# ---- routers and experts ------------------------------------------------------------------------
def test_router_counts_equal_a_hand_count_of_top_k(mixtral):
    ids = windows(5, 8)
    parts = by_hand(mixtral, ids)
    with torch.no_grad():
        theirs = mixtral(ids, output_router_logits=True).router_logits
    k = mixtral.config.num_experts_per_tok
    (stats,) = run(mixtral, ids, [RouterCounts()], batch_size=2)
    assert stats.top_k == k and stats.counts.shape == (4, 4)
    for i, layer in enumerate(mixtral.model.layers):
        x = parts[i]["mlp_in"].reshape(-1, 32)
        logits = x @ layer.mlp.gate.weight.T  # [B*T, E]
        torch.testing.assert_close(logits, theirs[i], rtol=1e-5, atol=1e-5)
        probs = torch.softmax(logits, dim=-1)
        hand = Counter()
        for row in probs:  # one token at a time
            hand.update(torch.topk(row, k).indices.tolist())
        assert stats.counts[i].tolist() == [hand[e] for e in range(4)]
        assert stats.tokens[i] == ids.numel()
        np.testing.assert_allclose(stats.mass[i], probs.double().sum(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats.frequency().sum(1), k)
    np.testing.assert_allclose(stats.mean_probability().sum(1), 1)


def test_router_counts_skip_padding(mixtral):
    ids, mask = right_padded(windows(5, 8))
    (padded,) = run(mixtral, ids, [RouterCounts(layers=[1])], attention_mask=mask)
    total = np.zeros(4, dtype=int)
    for w, m in zip(ids, mask, strict=True):
        (one,) = run(mixtral, w[m.bool()][None], [RouterCounts(layers=[1])])
        total += one.counts[1]
    assert padded.counts[1].tolist() == total.tolist()
    assert padded.tokens.tolist() == [0, int(mask.sum()), 0, 0]


def silu_glu(x, gate, up):
    return F.silu(x @ gate.T) * (x @ up.T)


def test_neuron_stats_of_the_mlp_intermediate(llama, mixtral):
    ids = windows(5, 8)
    parts = by_hand(llama, ids)
    (stats,) = run(llama, ids, [NeuronStats()], batch_size=2)
    for i, layer in enumerate(llama.model.layers):
        mlp = layer.mlp
        h = silu_glu(parts[i]["mlp_in"], mlp.gate_proj.weight, mlp.up_proj.weight).reshape(-1, 72)
        torch.testing.assert_close(
            h @ mlp.down_proj.weight.T, parts[i]["mlp_out"].reshape(-1, 32), rtol=1e-5, atol=1e-6
        )
        s = stats[i]
        assert s.count == ids.numel()
        torch.testing.assert_close(s.mean_abs, h.abs().double().mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(s.mean_sq, (h * h).double().mean(0), rtol=1e-5, atol=1e-7)

    # Mixtral: one key per (layer, expert), over the tokens routed to that expert
    parts = by_hand(mixtral, ids)
    k = mixtral.config.num_experts_per_tok

    class Moe(Collector):  # Σ_e weight * y_e per token: must rebuild the MoE block's output
        site = "mlp_hidden"

        def start(self, model, num_layers):
            self.out = {}

        def update(self, c: Capture):
            assert c.expert is not None and c.weight is not None
            acc = self.out.setdefault((c.layer, c.batch), {})
            acc[c.expert] = (c.x.shape[0], c.weight, c.y)

        def result(self):
            return self.out

    stats, moe, routers = run(mixtral, ids, [NeuronStats(), Moe(), RouterCounts()], batch_size=5)
    for i, layer in enumerate(mixtral.model.layers):
        x = parts[i]["mlp_in"].reshape(-1, 32)
        probs = torch.softmax(x @ layer.mlp.gate.weight.T, dim=-1)
        top = torch.topk(probs, k).indices
        rebuilt = torch.zeros_like(x)
        for e in range(4):
            w1, w3 = layer.mlp.experts.gate_up_proj[e].chunk(2, dim=0)
            routed = (top == e).any(-1)
            h = silu_glu(x[routed], w1, w3)
            s = stats[(i, e)]
            assert s.count == int(routed.sum()) == routers.counts[i, e]
            torch.testing.assert_close(s.mean_abs, h.abs().double().mean(0), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(s.mean_sq, (h * h).double().mean(0), rtol=1e-5, atol=1e-7)
            _, weight, y = moe[(i, 0)][e]
            gate = probs[routed][:, e] / torch.topk(probs[routed], k).values.sum(-1)
            torch.testing.assert_close(weight, gate, rtol=1e-5, atol=1e-6)
            rebuilt[routed] += weight[:, None] * y
        torch.testing.assert_close(
            rebuilt, parts[i]["mlp_out"].reshape(-1, 32), rtol=1e-4, atol=1e-5
        )


# ---- reservoir ----------------------------------------------------------------------------------
def test_reservoir_holding_everything_is_every_pair_in_order(llama):
    ids = windows(5, 8)
    parts = by_hand(llama, ids)
    (sample,) = run(llama, ids, [Reservoir("mlp", size=1000, layers=[2])], batch_size=2)
    s = sample[2]
    assert s.seen == ids.numel() and s.x.shape == (ids.numel(), 32)
    torch.testing.assert_close(s.x, parts[2]["mlp_in"].reshape(-1, 32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.y, parts[2]["mlp_out"].reshape(-1, 32), rtol=1e-5, atol=1e-6)


def test_reservoir_sample_is_real_pairs_and_repeats_from_its_seed(llama):
    ids = windows(6, 8)
    mlp = llama.model.layers[1].mlp
    a, b, c = run(
        llama,
        ids,
        [Reservoir("mlp", 10, seed=1), Reservoir("mlp", 10, seed=1), Reservoir("mlp", 10, seed=2)],
        batch_size=4,
    )
    assert a[1].seen == ids.numel() and a[1].x.shape == (10, 32)
    ref = mlp.down_proj(silu_glu(a[1].x, mlp.gate_proj.weight, mlp.up_proj.weight))
    torch.testing.assert_close(a[1].y, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(a[1].x, b[1].x) and not torch.equal(a[1].x, c[1].x)


def algorithm_r(n, k, seed, key=(0, -1)):
    """Algorithm R one row at a time, with the draws the collector's generator makes."""
    rng = np.random.default_rng([seed, key[0], key[1] + 1])
    res = [None] * k
    for p in range(n):
        if p < k:
            res[p] = p
        else:
            j = int(rng.integers(0, p + 1))
            if j < k:
                res[j] = p
    return res


def feed(collector, n, step, width=1):
    """Rows 0..n-1 (x = y = the row number) in batches of ``step``, through ``update``."""
    collector.start(None, 1)
    for b, lo in enumerate(range(0, n, step)):
        x = torch.arange(lo, min(n, lo + step), dtype=torch.float32)[:, None].repeat(1, width)
        mask = torch.ones(x.shape[0], dtype=torch.bool)
        collector.update(Capture(0, b, x, x, mask))
    return collector.result()[0]


def test_reservoir_is_algorithm_r_and_uniform():
    n, k = 40, 10
    for seed in range(5):
        s = feed(Reservoir(size=k, seed=seed), n, 7)
        assert s.x[:, 0].long().tolist() == algorithm_r(n, k, seed) and s.seen == n
    seen = np.zeros(n)
    seeds = 400
    for seed in range(seeds):
        seen[feed(Reservoir(size=k, seed=seed), n, 7).x[:, 0].long().numpy()] += 1
    freq = seen / seeds  # every row is kept with probability k / n
    assert np.abs(freq - k / n).max() < 5 * math.sqrt(k / n * (1 - k / n) / seeds)


# ---- sequential mode ----------------------------------------------------------------------------
def scale_o_proj(model, i, factor):
    with torch.no_grad():
        model.model.layers[i].self_attn.o_proj.weight.mul_(factor)


def test_sequential_sees_the_modified_layers_before_it(llama):
    ids, mask = right_padded(windows(5, 8))
    model = copy.deepcopy(llama)
    original = copy.deepcopy(llama)
    n_layers = model.config.num_hidden_layers
    calls, factors = [], {}

    def before(i):
        calls.append(("before", i))

    def after(i, cs):  # like SliceGPT: modify layer i from the statistics just collected
        calls.append(("after", i))
        g = cs[0].result()[i]
        factors[i] = 1.5 + g.xtx.trace().item() / g.tokens / 100
        scale_o_proj(model, i, factors[i])

    got_in, got_out = run(
        model,
        ids,
        [Gram("layer"), Gram("layer", "output")],
        attention_mask=mask,
        batch_size=2,
        sequential=True,
        before_layer=before,
        after_layer=after,
    )
    assert calls == [(w, i) for i in range(n_layers) for w in ("before", "after")]
    # by hand: layer i's input and output with layers < i modified, layers >= i as they were
    for i in range(n_layers):
        ref = copy.deepcopy(original)
        for j in range(i):
            scale_o_proj(ref, j, factors[j])
        ref_in = torch.zeros(32, 32, dtype=torch.float64)
        ref_out = torch.zeros(32, 32, dtype=torch.float64)
        for w, m in zip(ids, mask, strict=True):
            parts = by_hand(ref, w[m.bool()][None])
            ref_in += gram(parts[i]["input"][0])
            ref_out += gram(parts[i]["output"][0])
        torch.testing.assert_close(got_in[i].xtx, ref_in, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got_out[i].xtx, ref_out, rtol=1e-5, atol=1e-4)
        assert math.isclose(
            factors[i], 1.5 + ref_in.trace().item() / got_in[i].tokens / 100, rel_tol=1e-6
        )
        expected = original.model.layers[i].self_attn.o_proj.weight * factors[i]
        torch.testing.assert_close(model.model.layers[i].self_attn.o_proj.weight, expected)
    # the modification matters: the plain run on the original model differs after layer 0
    (plain,) = run(original, ids, [Gram("layer")], attention_mask=mask)
    torch.testing.assert_close(plain[0].xtx, got_in[0].xtx)
    assert not torch.allclose(plain[2].xtx, got_in[2].xtx, rtol=1e-3)


def test_sequential_without_callbacks_equals_the_plain_run(llama):
    ids = windows(6, 9)
    seq, seq_mean = run(
        llama, ids, [LayerIO(), PooledMean(pool="mean")], batch_size=4, sequential=True
    )
    plain, plain_mean = run(llama, ids, [LayerIO(), PooledMean(pool="mean")], batch_size=4)
    for name in ("io_cos", "io_cos_all", "io_cos_other", "angles", "angles_other"):
        np.testing.assert_allclose(getattr(seq, name), getattr(plain, name), rtol=1e-6, atol=1e-9)
    assert (seq.samples, seq.tokens, seq.pairs_other) == (
        plain.samples,
        plain.tokens,
        plain.pairs_other,
    )
    for i in plain_mean:
        torch.testing.assert_close(seq_mean[i], plain_mean[i])


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "cohere2"])
def test_sequential_with_sliding_window_layers_equals_the_plain_run(family, tmp_path):
    """Layers of two attention types (sliding window of 3, full) get their own masks: the
    sequential run's layer inputs and outputs are the plain forward pass's."""
    from families import build
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build(family, tmp_path / "m")).eval()
    assert len(set(model.config.layer_types)) == 2
    ids = torch.randint(3, 96, (5, 12), generator=torch.Generator().manual_seed(0))
    seq = run(model, ids, [LayerIO()], batch_size=2, sequential=True)[0]
    plain = run(model, ids, [LayerIO()], batch_size=2)[0]
    for name in ("io_cos", "angles"):
        np.testing.assert_allclose(getattr(seq, name), getattr(plain, name), rtol=1e-6, atol=1e-9)
    # the masks matter here: every layer with layer 0's mask gives other numbers
    kinds = model.config.layer_types
    model.config.layer_types = [kinds[0]] * len(kinds)
    wrong = run(model, ids, [LayerIO()], batch_size=2)[0]
    assert not np.allclose(wrong.angles, plain.angles, rtol=1e-4)


def test_sequential_moe_equals_the_plain_run(mixtral):
    ids, mask = right_padded(windows(5, 8))
    kw = {"attention_mask": mask, "batch_size": 2}
    seq = run(mixtral, ids, [RouterCounts(), NeuronStats()], sequential=True, **kw)
    plain = run(mixtral, ids, [RouterCounts(), NeuronStats()], **kw)
    assert seq[0].counts.tolist() == plain[0].counts.tolist() and seq[0].counts.sum() > 0
    assert sorted(seq[1]) == sorted(plain[1])
    for key, s in seq[1].items():
        assert s.count == plain[1][key].count
        torch.testing.assert_close(s.mean_sq, plain[1][key].mean_sq)


# ---- LayerIO is the old layer_statistics ---------------------------------------------------------
def old_layer_statistics(model, input_ids, batch_size):
    """``layer_statistics`` (then splice.activations) before the runner (verbatim, trimmed)."""
    layers = model.model.layers
    n = len(layers)
    z, bb = np.zeros(n), np.zeros((n + 1, n + 1))
    s = {"io_cos": z.copy(), "io_cos_all": z.copy(), "io_cos_other": z.copy()}
    s.update(angles=bb.copy(), angles_other=bb.copy(), samples=0, tokens=0, tokens_all=0)
    s["pairs_other"] = 0
    batch_state = {}

    def angles(x):
        u = F.normalize(x.to(torch.float64), dim=-1)
        return torch.arccos((u @ u.transpose(1, 2)).clamp(-1, 1)).sum(0)

    def cross(x, y):
        u = F.normalize(x.to(torch.float64), dim=-1)
        v = F.normalize(y.to(torch.float64), dim=-1)
        return torch.arccos((u @ v.transpose(1, 2)).clamp(-1, 1)).sum(0)

    def hook(index):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            xf, yf = x.float(), y.float()
            cos = F.cosine_similarity(xf, yf, dim=-1)
            s["io_cos_all"][index] += float(cos.sum())
            s["io_cos"][index] += float(cos[:, 1:].sum())
            t = x.shape[1]
            if t > 2:
                shifted = torch.roll(yf[:, 1:], shifts=(t - 1) // 2, dims=1)
                s["io_cos_other"][index] += float(
                    F.cosine_similarity(xf[:, 1:], shifted, dim=-1).sum()
                )
            if index == 0:
                batch_state["last"] = [x[:, -1].detach().float()]
            batch_state["last"].append(y[:, -1].detach().float())

        return fn

    handles = [
        layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        with torch.inference_mode():
            for batch in torch.split(input_ids, batch_size):
                model(input_ids=batch, use_cache=False, logits_to_keep=1)
                last = torch.stack(batch_state.pop("last"), dim=1).cpu()
                b, t = batch.shape
                s["samples"] += b
                s["tokens"] += b * (t - 1)
                s["tokens_all"] += b * t
                s["angles"] += angles(last).numpy()
                if b > 1:
                    s["angles_other"] += cross(last, torch.roll(last, 1, dims=0)).numpy()
                    s["pairs_other"] += b
    finally:
        for h in handles:
            h.remove()
    if t <= 2:
        s["io_cos_other"][:] = np.nan
    return s


@pytest.mark.parametrize("shape,batch", [((7, 10), 3), ((3, 2), 2)])
def test_layer_io_equals_the_old_layer_statistics(llama, shape, batch):
    ids = windows(*shape)
    old = old_layer_statistics(llama, ids, batch)
    new = layer_statistics(llama, ids, batch_size=batch)
    for name, value in old.items():
        np.testing.assert_array_equal(getattr(new, name), value, err_msg=name)
    assert new.num_layers == 4


# ---- pooled means -------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooled_mean_with_padding(llama, side):
    ids = windows(5, 8)
    mask = torch.zeros_like(ids)
    lengths = [8, 3, 6, 8, 5]
    padded = torch.zeros_like(ids)
    for r, n in enumerate(lengths):  # the row's real tokens at its start or end
        span = slice(8 - n, 8) if side == "left" else slice(0, n)
        padded[r, span] = ids[r, :n]
        mask[r, span] = 1
    last, mean = run(
        llama, padded, [PooledMean(), PooledMean("layer", "output", "mean")], attention_mask=mask
    )
    with torch.no_grad():
        for i in range(4):
            ref_last = torch.zeros(32, dtype=torch.float64)
            ref_mean = torch.zeros(32, dtype=torch.float64)
            for r, n in enumerate(lengths):
                hs = by_hand(llama, ids[r, :n][None])[i]
                ref_last += hs["input"][0, -1].double()
                ref_mean += hs["output"][0].double().mean(0)
            torch.testing.assert_close(last[i], ref_last / 5, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mean[i], ref_mean / 5, rtol=1e-5, atol=1e-6)


# ---- memory -------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Bytes of CPU storages created by torch ops while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.sizes = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.sizes:
                    self.sizes[ptr] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, ptr)
        return out

    def _free(self, ptr):
        self.live -= self.sizes.pop(ptr, 0)


class Hoard(Collector):
    """Keeps every layer input: what the runner must not do (the control)."""

    def start(self, model, num_layers):
        self.kept = []

    def update(self, c):
        self.kept.append(c.x.clone())

    def result(self):
        return len(self.kept)


def peak(model, n, collectors, **kw):
    ids = windows(n, 16, seed=n)
    with LiveBytes() as m:
        m.sizes[ids.untyped_storage().data_ptr()] = 0  # the caller's windows: not the run's
        out = run(model, ids, collectors(), batch_size=4, **kw)
        del out
    return m.peak


def test_memory_stays_at_one_batch(llama):
    def every():
        return [LayerIO(), Gram("layer"), NeuronStats(), Reservoir("mlp", 32), PooledMean()]

    few, many = peak(llama, 8, every), peak(llama, 96, every)
    states = 96 * 16 * 32 * 4  # one boundary's hidden states of the 96 windows, float32
    batch = 4 * 16 * 32 * 4  # one of one batch
    layers = llama.config.num_hidden_layers
    # what LayerIO keeps per window for paired differences: its last-token angles [L+1, L+1]
    # and two io cosines per layer, float64 (scalars per window, not hidden states)
    per_window = ((layers + 1) ** 2 + 2 * layers) * 8
    assert few > 4 * batch  # the count sees the run's tensors
    assert many <= few + 1024 + (96 - 8) * per_window  # 12 times the windows, the same peak
    assert many < 5 * states / 4  # all L+1 boundaries would be 5 * states
    # the control: a collector that keeps what it sees grows with the windows
    assert peak(llama, 96, lambda: [Hoard()]) > 4 * states
    # sequential mode keeps the layer inputs of all windows, and not much more
    seq = peak(llama, 96, every, sequential=True)
    assert states < seq < states + 2 * many


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,message",
    [
        ({"collectors": [RouterCounts(top_k=2)]}, "no MoE router"),
        ({"collectors": [Gram("mlp.nope")]}, "has no module 'mlp.nope'"),
        ({"collectors": [Gram(layers=[4])]}, "layer 4 is out of range"),
        ({"collectors": [Gram(part="middle")]}, "part must be 'input' or 'output'"),
        ({"collectors": [PooledMean(pool="max")]}, "pool must be 'last' or 'mean'"),
        ({"collectors": [PooledMean("router")]}, "no MoE router"),
        ({"collectors": [Reservoir(size=0)]}, "size must be 1 or more"),
        ({"collectors": []}, "at least one collector"),
        ({"windows": torch.zeros(2, 3)}, "tensor of token ids"),
        ({"attention_mask": torch.ones(2, 5)}, "the windows' shape"),
        ({"attention_mask": torch.full((3, 6), 2)}, "0 and 1 only"),
        ({"attention_mask": torch.zeros(3, 6, dtype=torch.long)}, "a window has no real token"),
        ({"batch_size": 0}, "batch_size must be 1 or more"),
        ({"device": "meta"}, "the model is on cpu, not on the run's device meta"),
        ({"device": "gpu9"}, "not a device"),
        ({"after_layer": lambda i, cs: None}, "need sequential=True"),
        (
            {
                "collectors": [LayerIO()],
                "attention_mask": torch.tensor([[1] * 6, [1] * 6, [1] * 4 + [0] * 2]),
            },
            "unpadded windows",
        ),
    ],
)
def test_bad_input_is_one_line(llama, kw, message):
    args = {"windows": windows(3, 6), "collectors": [Gram()], **kw}
    with pytest.raises(SpliceError, match=message) as e:
        run(llama, args.pop("windows"), args.pop("collectors"), **args)
    assert "\n" not in str(e.value)


def test_sequential_refuses_mixed_attention_kinds_it_cannot_place(llama):
    """Types given for other modules than the model's layers (a wrong count) are refused."""
    model = copy.deepcopy(llama)
    model.config.layer_types = ["full_attention", "sliding_attention"] * 2
    with pytest.raises(SpliceError, match="different attention masks"):
        run(model, windows(2, 4), [Gram()], sequential=True, layer_types=["full_attention"] * 3)
