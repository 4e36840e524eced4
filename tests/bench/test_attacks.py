"""bench/attacks.py: each attack changes what it says and nothing else, is deterministic, and the
ones that claim to preserve the function do (checked through the tokenizers); and the attacks the lineage
test now withstands still fail (the last section: the only one that trains, briefly)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import attacks as A  # noqa: E402
from bench import transforms as T  # noqa: E402
from bench.evasion import evades, evades_private, report  # noqa: E402
from bench.zoo import corpus  # noqa: E402
from tg_verify.analysis.lineage import lineage_test  # noqa: E402
from tg_verify.fingerprint.sketch import probe_ids  # noqa: E402
from tg_verify.tiny import ARCHITECTURES, build_model, one_thread  # noqa: E402


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def text() -> str:
    return bytes(corpus("pretrain", 40_000).to(torch.uint8).numpy()).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tokenizer(text):
    return A.train_tokenizer(text, 512)


def checkpoint(arch: str, vocab: int = 512, seed: int = 0) -> T.Checkpoint:
    return T.from_model(build_model(arch, seed=seed, vocab_size=vocab))


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    return set(torch.nonzero((a != b).any(dim=1)).flatten().tolist())


# -- row re-draws -------------------------------------------------------------------------------------

def test_random_rows_are_the_fraction_nested_and_seeded():
    small, large = A.random_rows(512, 0.1, 7), A.random_rows(512, 0.5, 7)
    assert len(small) == 51 and len(large) == 256 and len(set(large)) == 256
    assert set(small) <= set(large)
    assert A.random_rows(512, 0.1, 7) == small != A.random_rows(512, 0.1, 8)
    assert A.random_rows(512, 1.0, 7) == list(range(512))
    with pytest.raises(ValueError):
        A.random_rows(512, 1.5, 0)


@pytest.mark.parametrize("noise", [None, 1.0])
def test_redraw_changes_exactly_the_chosen_embedding_rows(noise):
    ck = checkpoint("llama")  # untied head
    ids = A.random_rows(512, 0.25, 3)
    out = A.redraw_rows(ck, ids, seed=5, noise=noise)
    assert changed_rows(ck.state[A.EMBED], out.state[A.EMBED]) == set(ids)
    assert all(torch.equal(v, out.state[k]) for k, v in ck.state.items() if k != A.EMBED)
    with_head = A.redraw_rows(ck, ids, seed=5, noise=noise, head=True)
    assert changed_rows(ck.state[A.HEAD], with_head.state[A.HEAD]) == set(ids)
    assert torch.equal(with_head.state[A.EMBED], out.state[A.EMBED])
    # deterministic for a seed, different for another; the input is not modified
    assert torch.equal(A.redraw_rows(ck, ids, seed=5, noise=noise).state[A.EMBED], out.state[A.EMBED])
    assert not torch.equal(A.redraw_rows(ck, ids, seed=6, noise=noise).state[A.EMBED], out.state[A.EMBED])
    assert torch.equal(ck.state[A.EMBED], checkpoint("llama").state[A.EMBED])


def test_tied_head_follows_the_embedding():
    ck = checkpoint("gemma")
    assert ck.config.tie_word_embeddings and A.HEAD not in ck.state
    probe = probe_ids(512, 32, 0).tolist()
    out = A.redraw_rows(ck, probe, seed=1)
    model = out.model()
    assert torch.equal(model.get_output_embeddings().weight, out.state[A.EMBED])
    assert changed_rows(ck.state[A.EMBED], model.get_output_embeddings().weight.detach()) == set(probe)


def test_redraw_follows_the_embedding_statistics_and_noise_its_stated_size():
    ck = checkpoint("qwen2")
    weight = ck.state[A.EMBED]
    ids = A.random_rows(512, 0.5, 1)
    new = A.redraw_rows(ck, ids, seed=2).state[A.EMBED][ids]
    assert torch.allclose(new.mean(0), weight.mean(0), atol=0.25 * float(weight.std()))
    assert float(new.std()) == pytest.approx(float(weight.std()), rel=0.1)
    for size in (0.25, 1.0, 2.0):
        noisy = A.redraw_rows(ck, ids, seed=2, noise=size).state[A.EMBED][ids]
        ratio = ((noisy - weight[ids]).norm(dim=1) / weight[ids].norm(dim=1)).mean()
        assert float(ratio) == pytest.approx(size, rel=0.05)


def test_public_probe_reads_the_published_ids():
    ids = [3, 9, 40, 100]
    assert A.public_probe(SimpleNamespace(sketch={"probe": {"ids": ids, "vocab": 512}})) == ids
    fallback = A.public_probe(SimpleNamespace(sketch={"probe": {"vocab": 512}}))
    assert fallback == probe_ids(512, 32, 0).tolist()


# -- relabelling --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_relabelling_moves_exactly_the_fraction(fraction):
    perm = A.relabelling(512, fraction, seed=4)
    assert sorted(perm.tolist()) == list(range(512))
    assert int((perm != torch.arange(512)).sum()) == round(fraction * 512)
    assert torch.equal(perm, A.relabelling(512, fraction, seed=4))
    assert not torch.equal(perm, A.relabelling(512, fraction, seed=5))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_relabelling_with_its_tokenizer_preserves_the_function_at_the_text_level(arch, tokenizer, text):
    from tokenizers import Tokenizer

    ck = checkpoint(arch, vocab=tokenizer.get_vocab_size())
    perm = A.relabelling(tokenizer.get_vocab_size(), 1.0, seed=1)
    out = A.relabel(ck, perm)
    rewritten = Tokenizer.from_str(A.relabel_tokenizer(tokenizer.to_str(), perm))
    moved = changed_rows(ck.state[A.EMBED], out.state[A.EMBED])
    assert len(moved) == tokenizer.get_vocab_size()  # every row moved...
    assert torch.equal(out.state[A.EMBED][perm], ck.state[A.EMBED])  # ...to its new id
    sample = text[-2000:]
    assert torch.equal(A.encode(rewritten, sample), perm[A.encode(tokenizer, sample)])
    assert A.text_level_difference(ck, tokenizer, out, rewritten, sample, perm) <= 1e-4
    # the check can fail: the old tokenizer with the new weights, a wrong claimed correspondence, or the new
    # tokenizer with the old weights
    with pytest.raises(AssertionError):
        A.text_level_difference(ck, tokenizer, out, tokenizer, sample, perm)
    with pytest.raises(AssertionError):
        A.text_level_difference(ck, tokenizer, out, rewritten, sample, torch.arange(len(perm)))
    assert A.text_level_difference(ck, tokenizer, ck, rewritten, sample, perm) > 1e-2
    # and the relabelled model still passes every re-parameterisation's function check
    T.same_function(out, T.all_evasions(out))


def test_reencoded_strings_keep_ids_and_text(tokenizer, text):
    from tokenizers import Tokenizer

    vocab = tokenizer.get_vocab_size()
    reencoded = Tokenizer.from_str(A.reencode_tokenizer(tokenizer.to_str(), seed=1))
    sample = text[-3000:]
    assert torch.equal(A.encode(reencoded, sample), A.encode(tokenizer, sample))
    assert reencoded.decode(reencoded.encode(sample).ids) == tokenizer.decode(tokenizer.encode(sample).ids)
    changed = sum(reencoded.id_to_token(i) != tokenizer.id_to_token(i) for i in range(vocab))
    assert changed >= 0.7 * vocab  # whitespace-only tokens and contraction letters keep their strings
    assert reencoded.to_str() == Tokenizer.from_str(A.reencode_tokenizer(tokenizer.to_str(), seed=1)).to_str()
    assert reencoded.to_str() != Tokenizer.from_str(A.reencode_tokenizer(tokenizer.to_str(), seed=2)).to_str()
    # with an id relabelling on top: neither ids nor strings match the original, the function does
    ck = checkpoint("llama", vocab=vocab)
    perm = A.relabelling(vocab, 1.0, seed=5)
    both = Tokenizer.from_str(A.reencode_tokenizer(A.relabel_tokenizer(tokenizer.to_str(), perm), seed=1))
    assert A.text_level_difference(ck, tokenizer, A.relabel(ck, perm), both, sample, perm) <= 1e-4


def test_relabelled_perplexity_equals_the_original(tokenizer, text):
    from tokenizers import Tokenizer

    ck = checkpoint("phi3", vocab=tokenizer.get_vocab_size())
    perm = A.relabelling(tokenizer.get_vocab_size(), 0.25, seed=2)
    rewritten = Tokenizer.from_str(A.relabel_tokenizer(tokenizer.to_str(), perm))
    sample = text[-6000:]
    before = A.perplexity(ck.model(), A.encode(tokenizer, sample), context=64, windows=8)
    after = A.perplexity(A.relabel(ck, perm).model(), A.encode(rewritten, sample), context=64, windows=8)
    assert after == pytest.approx(before, rel=1e-5)


def test_relabel_keeps_special_token_ids_consistent():
    ck = checkpoint("phi3")  # pad 0, bos 1, eos 2
    perm = A.relabelling(512, 1.0, seed=3)
    out = A.relabel(ck, perm)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        old = getattr(ck.config, name)
        assert getattr(out.config, name) == int(perm[old])
        assert torch.equal(out.state[A.EMBED][getattr(out.config, name)], ck.state[A.EMBED][old])


# -- perplexity -----------------------------------------------------------------------------------------

def test_perplexity_is_exp_of_the_mean_next_token_loss():
    model = build_model("mistral", seed=2)
    tokens = torch.randint(0, 512, (3 * 32 + 5,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(input_ids=tokens[:96].reshape(3, 32), labels=tokens[:96].reshape(3, 32)).loss
    assert A.perplexity(model, tokens, context=32, windows=10, batch=2) == pytest.approx(float(loss.exp()), rel=1e-5)
    with pytest.raises(ValueError):
        A.perplexity(model, tokens[:10], context=32)


# -- the adaptive attacker's view of the sketch and the probe it aims at -----------------------------------

def _keys_and_fingerprint(tmp_path, ck, tokenizer):
    directory = ck.save(tmp_path / "m")
    tokenizer.save(str(directory / "tokenizer.json"))
    fp = T.fingerprint_of(ck, directory)  # saves again, keeps tokenizer.json
    return A.token_keys(directory / "tokenizer.json", ck.config.vocab_size), fp


def test_probe_coefficients_are_the_ones_the_sketch_uses(tmp_path, tokenizer):
    from tg_verify.fingerprint.sketch import (
        HEAD_ROWS,
        flatten_probe,
        flatten_start,
        normalise,
        sketch_units,
        smallest_keys,
        unit_rows,
    )

    ck = checkpoint("qwen2", vocab=tokenizer.get_vocab_size())
    keys, fp = _keys_and_fingerprint(tmp_path, ck, tokenizer)
    assert keys.kind == "strings" and fp.sketch["probe"]["keys"] == "strings"
    c = A.probe_coefficients(fp, keys)
    rows = unit_rows(ck.state[A.EMBED])
    mixtures = unit_rows(c.float() @ rows)
    # tgs3 flattens the mixtures along the leading directions of a keyed sample of the rows: a fixed
    # linear map for given weights, so the evader's C still names what the probe is made of
    sample = torch.from_numpy(smallest_keys(keys, HEAD_ROWS))
    probe = flatten_probe(mixtures, rows[sample], flatten_start(keys.keys[sample.numpy()], rows.shape[1]).float())
    embed = sketch_units(ck.state, ck.config.to_dict(), keys)[("embed", None)]
    assert torch.allclose(normalise(probe @ probe.T, True), embed, atol=1e-5)


def test_sketch_penalty_follows_the_library_test(tmp_path, tokenizer):
    vocab = tokenizer.get_vocab_size()
    base = checkpoint("llama", vocab=vocab, seed=1)
    keys, base_fp = _keys_and_fingerprint(tmp_path / "base", base, tokenizer)
    penalty = A.SketchPenalty(base, 2.0, A.library_units(keys))
    model = base.model()  # identical: every similarity is 1
    value = penalty(model)
    assert float(value.detach()) == pytest.approx(2.0, abs=1e-3)
    value.backward()
    grads = dict(model.named_parameters())
    assert int((grads[A.EMBED].grad.abs().sum(dim=1) > 0).sum()) > vocab // 2  # a mixture reads every keyed row
    assert grads["model.layers.0.mlp.down_proj.weight"].grad.abs().sum() > 0
    assert float(A.SketchPenalty(base, 0.0, A.library_units(keys))(model).detach()) == 0.0
    # the per-unit similarities are those of the test itself
    other = A.redraw_rows(base, A.random_rows(vocab, 0.3, 1), seed=3, noise=0.7)
    _, other_fp = _keys_and_fingerprint(tmp_path / "other", other, tokenizer)
    result = lineage_test(other_fp, base_fp)
    library = {(u.role, u.candidate_layer): u.similarity for u in result.units if u.role != "embed"}
    with torch.no_grad():
        sims = penalty.similarity(other.model())
    assert set(sims) == set(library)
    assert max(abs(float(v) - library[k]) for k, v in sims.items()) < 2e-3  # float16 storage


def test_sketch_penalty_over_fresh_seeds_is_deterministic_and_seed_dependent(tmp_path, tokenizer):
    vocab = tokenizer.get_vocab_size()
    base = checkpoint("phi3", vocab=vocab, seed=2)
    keys, _ = _keys_and_fingerprint(tmp_path, base, tokenizer)
    other = A.redraw_rows(base, A.random_rows(vocab, 0.5, 1), seed=3, noise=1.0).model()

    def values(seeds_per_step: int, seed: int) -> list[float]:
        penalty = A.SketchPenalty(base, 1.0, A.library_units(keys), seeds_per_step=seeds_per_step, seed=seed)
        with torch.no_grad():
            return [float(penalty(other)) for _ in range(3)]

    public, fresh = values(0, 0), values(2, 0)
    assert public[0] == public[1] == public[2]  # always seed 0
    assert len(set(fresh)) == 3  # new seeds at every call...
    assert fresh == values(2, 0) != values(2, 1)  # ...drawn deterministically
    identical = A.SketchPenalty(base, 3.0, A.library_units(keys), seeds_per_step=2)
    with torch.no_grad():
        assert float(identical(base.model())) == pytest.approx(3.0, abs=1e-3)


# -- the adaptive attacker's view of the block evidence -----------------------------------------------------

def _library_block_score(candidate: T.Checkpoint, reference: T.Checkpoint, tmp_path: Path) -> float:
    """What the library scores from the two folders (build_blocks, float16 storage, block_score)."""
    from tg_verify.analysis.blocks import block_score, parse_blocks
    from tg_verify.artifact import open_reader, resolve
    from tg_verify.fingerprint.blocks import build_blocks

    parsed = []
    for name, ck in (("candidate", candidate), ("reference", reference)):
        artifact = resolve(ck.save(tmp_path / name))
        with open_reader(artifact) as reader:
            parsed.append(parse_blocks(build_blocks(artifact, reader), name))
    score = block_score(parsed[0], parsed[1]).score
    assert score is not None
    return score


def _perturbed(ck: T.Checkpoint, scale: float, seed: int) -> T.Checkpoint:
    """Every block matrix with Gaussian noise `scale` x its own standard deviation."""
    out = ck.clone()
    generator = torch.Generator().manual_seed(seed)
    for name, weight in out.state.items():
        if name.startswith("model.layers.") and weight.dim() == 2:
            out.state[name] = weight + scale * weight.std() * torch.randn(weight.shape, generator=generator)
    return out


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma"])
def test_block_penalty_is_the_library_block_score(arch, tmp_path):
    base = checkpoint(arch, seed=1)
    penalty = A.BlockPenalty(base, 3.0)
    for n, candidate in enumerate([base, _perturbed(base, 0.5, 2), _perturbed(base, 1.5, 3), checkpoint(arch, seed=4)]):
        model = candidate.model()
        with torch.no_grad():
            forward, backward = penalty.directions(model)
            ours = float(penalty.score(model))
            value = float(penalty(model))
        assert ours == pytest.approx(_library_block_score(candidate, base, tmp_path / str(n)), abs=1e-3)
        assert value == pytest.approx(3.0 * (float(forward) ** 2 + float(backward) ** 2) / 2, rel=1e-5)
    assert ours < 0.3  # an independent initialisation is far from the base (the candidates span the range)


def test_block_penalty_steps_lower_the_block_score(tmp_path):
    base = checkpoint("qwen2", seed=1)
    candidate = _perturbed(base, 0.3, 2)
    model = candidate.model()
    penalty = A.BlockPenalty(base, 1.0)
    before = _library_block_score(candidate, base, tmp_path / "before")
    value = penalty(model)
    value.backward()
    grads = dict(model.named_parameters())
    assert grads["model.layers.0.self_attn.v_proj.weight"].grad.abs().sum() > 0  # the attention's OV ...
    assert grads["model.layers.0.mlp.down_proj.weight"].grad.abs().sum() > 0  # ... and the MLP's down-up
    assert grads[A.EMBED].grad is None or float(grads[A.EMBED].grad.abs().sum()) == 0  # no token enters it
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        optimiser.zero_grad(set_to_none=True)
        penalty(model).backward()
        optimiser.step()
    after = _library_block_score(T.from_model(model), base, tmp_path / "after")
    assert before > 0.5 and after < before - 0.2, (before, after)


def test_penalties_add_up():
    base = checkpoint("llama", seed=1)
    model = checkpoint("llama", seed=2).model()
    blocks = A.BlockPenalty(base, 2.0)
    with torch.no_grad():
        assert float(A.Penalties(blocks, blocks)(model)) == pytest.approx(2 * float(blocks(model)), rel=1e-6)


# -- reporting ------------------------------------------------------------------------------------------

def test_report_counts_only_cheap_evasions():
    def row(arch, ratio, derived, reparam, group="probe", private=True):
        return {"arch": arch, "group": group, "attack": "a", "strength": "s", "order": 1, "ppl_ratio": ratio,
                "score": 0.2, "threshold": 0.5, "derived": derived, "reparam_score": 0.2,
                "reparam_derived": reparam, "private_score": 0.9, "private_derived": private,
                "block_score": 0.7 if arch == "llama" else 0.5, "reparam_block_score": 0.6, "wide_block_score": 0.3,
                "block_derived": arch == "llama"}

    assert evades(row("x", 1.2, False, False)) and evades(row("x", 1.2, True, False))
    assert not evades(row("x", 1.2, True, True)) and not evades(row("x", 1.6, False, False))
    assert not evades_private(row("x", 1.2, False, False)) and evades_private(row("x", 1.2, True, True, private=False))
    results = {"rows": [row("llama", 1.2, False, False), row("gemma", 3.0, False, False),
                        row("llama", 1.0, False, False, "control")],
               "perplexities": {"llama": {"untrained": 600, "base": 9, "derivative": 8, "twin": 9}},
               "seconds": 60, "trained": 0}
    text = report(results)
    assert "| probe | a | s | 2.10 (1.20-3.00) | 0.20 (0.20-0.20) | 0.60 (0.50-0.70) | 0.30 (0.30-0.30) | 0/2 | " \
           "0 / 1 | 0.20 (0.20-0.20) | 0.60 (0.60-0.60) | 0/2 | 0.90 (0.90-0.90) | 2/2 | 1/2 | 0/2 |" in text
    assert "does not call derived: 1 of 2 (architecture x attack x strength), 0 of them" in text
    assert "Block score of the independent twins: n/c; of the cheap evasions above: 0.700." in text
    # a "not comparable" result has no score and is counted apart
    results["rows"][1].update(score=float("nan"), comparable=False, ppl_ratio=1.1)
    text = report(results)
    assert "| 0.20, 1 n/c | 0.60 (0.50-0.70) | 0.30 (0.30-0.30) | 0/2 (1 n/c) |" in text
    assert "does not call derived: 2 of 2 (architecture x attack x strength), 1 of them not comparable" in text


def test_redraw_directions_moves_the_mixture_probe_with_a_small_edit():
    ck = checkpoint("llama")
    coefficients = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))
    unit = ck.state[A.EMBED].double() / ck.state[A.EMBED].double().norm(dim=1, keepdim=True)
    before = coefficients.double() @ unit
    out = A.redraw_directions(ck, coefficients, seed=1)
    edited = out.state[A.EMBED].double()
    after = coefficients.double() @ (edited / edited.norm(dim=1, keepdim=True))
    # every probe vector now points elsewhere (nearly orthogonal to where it was) ...
    cosines = torch.nn.functional.cosine_similarity(before, after, dim=1)
    assert float(cosines.abs().max()) < 0.5
    # ... while each row moved by about sqrt(k / V) of its norm and kept its norm
    moved = (edited - ck.state[A.EMBED].double()).norm(dim=1) / ck.state[A.EMBED].double().norm(dim=1)
    assert float(moved.mean()) < 2 * (16 / 512) ** 0.5
    assert torch.allclose(edited.norm(dim=1), ck.state[A.EMBED].double().norm(dim=1), rtol=1e-5)
    assert all(torch.equal(v, out.state[k]) for k, v in ck.state.items() if k != A.EMBED)
    half = A.redraw_directions(ck, coefficients, seed=1, strength=0.5).state[A.EMBED].double()
    assert float((half - ck.state[A.EMBED]).norm()) < float((edited - ck.state[A.EMBED]).norm())
    assert torch.equal(A.redraw_directions(ck, coefficients, seed=1).state[A.EMBED], out.state[A.EMBED])


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_redraw_directions_on_a_row_probe_moves_only_those_rows(strength):
    ck = checkpoint("gemma")
    ids = probe_ids(512, 32, 0).tolist()
    onehot = torch.zeros(32, 512)
    onehot[torch.arange(32), torch.tensor(ids)] = 1.0
    out = A.redraw_directions(ck, onehot, seed=2, strength=strength)
    assert torch.isfinite(out.state[A.EMBED]).all()
    assert changed_rows(ck.state[A.EMBED], out.state[A.EMBED]) == set(ids)
    cosines = torch.nn.functional.cosine_similarity(out.state[A.EMBED][ids], ck.state[A.EMBED][ids], dim=1)
    assert float(cosines.mean()) < (0.95 if strength < 1 else 0.3)


# -- dead capacity ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dead_units_cancel_exactly_and_grow_the_model(arch):
    ck = checkpoint(arch)
    out = A.dead_units(ck, 1.0, 1.0, seed=3)
    heads, kv, hd = ck.heads
    assert out.heads == (2 * heads, 2 * kv, hd)  # a cancelling pair of groups per original pair
    assert out.config.intermediate_size == 2 * ck.config.intermediate_size
    assert T.same_function(ck, out, tolerance=1e-5) <= 1e-5 * 20
    T.same_function(out, T.all_evasions(out))  # still a model every re-parameterisation applies to
    for i in range(ck.layers):
        p = f"model.layers.{i}."
        gate, up = T.get_gate_up(out, i)
        down = out.state[p + "mlp.down_proj.weight"]
        old_gate, old_up = T.get_gate_up(ck, i)
        old_down = ck.state[p + "mlp.down_proj.weight"]
        # the product summed over units is unchanged (the pairs cancel in it too) ...
        assert torch.allclose(down.double() @ up.double(), old_down.double() @ old_up.double(), atol=1e-5)
        # ... a Gram of one matrix is not
        assert not torch.allclose(gate.T @ gate, old_gate.T @ old_gate, atol=1e-2)
    bigger = A.dead_units(ck, 4.0, 1.0, seed=3)  # as many groups as keep the width a multiple of the head count
    assert ck.config.hidden_size % bigger.heads[0] == 0 and bigger.heads[0] > out.heads[0]
    assert bigger.config.intermediate_size == 5 * ck.config.intermediate_size
    T.same_function(ck, bigger, tolerance=1e-5)
    assert A.dead_units(ck, 1.0, 1.0, seed=3).state.keys() == out.state.keys()
    assert torch.equal(A.dead_units(ck, 1.0, 1.0, seed=3).state[A.EMBED], out.state[A.EMBED])


def test_dead_units_are_not_dead_alone():
    # each unit of a pair writes to the residual stream: remove one half and the function changes
    ck = checkpoint("llama")
    out = A.dead_units(ck, 1.0, 1.0, seed=3)
    inter = ck.config.intermediate_size
    broken = out.clone()
    key = "model.layers.0.mlp.down_proj.weight"
    broken.state[key] = broken.state[key].clone()
    broken.state[key][:, inter + (out.config.intermediate_size - inter) // 2:] = 0
    with pytest.raises(AssertionError):
        T.same_function(ck, broken, tolerance=1e-3)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dead_blocks_add_nothing_to_the_residual_stream(arch):
    ck = checkpoint(arch)
    out = A.dead_blocks(ck, 1.0, seed=4)
    assert out.layers == 2 * ck.layers and out.heads == ck.heads
    assert T.same_function(ck, out, tolerance=1e-5) <= 1e-5 * 20
    for i in range(ck.layers):  # the original blocks sit at even positions, unchanged
        old, new = f"model.layers.{i}.", f"model.layers.{2 * i}."
        assert all(torch.equal(v, out.state[new + k[len(old):]]) for k, v in ck.state.items() if k.startswith(old))
        dead = f"model.layers.{2 * i + 1}."
        assert float(out.state[dead + "self_attn.o_proj.weight"].abs().min()) > 0  # no zero weights to spot
    T.same_function(out, T.all_evasions(out))


# -- regressions: attacks the method withstands (docs/evasion.md), on the test's own decision -------------
# Each attack below evaded an earlier sketch; these keep it from evading again. Tiny "small" models,
# pretrained 100 steps where the attack needs a model that has learnt something (the bench measures the
# same attacks on longer-trained models, with the damage beside the score).

def _fingerprint(ck: T.Checkpoint, directory: Path, seed: int = 0):
    """What `tg-verify fingerprint` computes, with the sketch's probe seed `seed` (0: the public default)."""
    from tg_verify.artifact import resolve
    from tg_verify.fingerprint.extract import fingerprint_artifact
    from tg_verify.fingerprint.settings import FingerprintSettings

    return fingerprint_artifact(resolve(ck.save(directory)), FingerprintSettings(device="cpu", sketch_seed=seed),
                                model_name=directory.name)


@pytest.fixture(scope="module")
def pretrained() -> T.Checkpoint:
    """A small llama pretrained 100 steps on source text (byte ids): a model with something to lose."""
    from bench.zoo import fine_tune

    with one_thread():
        tokens = corpus("pretrain", 200_000).long()
        return T.from_model(fine_tune(build_model("llama", seed=0), tokens, 100, 3e-3, 1))


@pytest.mark.parametrize("arch", ["llama", "gemma", "phi3"])
def test_dead_capacity_leaves_the_lineage_evidence(arch, tmp_path):
    # single-matrix units (the gate's Gram, q^T k) move under cancelling pairs; the test's median over roles,
    # with products that sum over units (o v, down up) and the head, does not
    ck = checkpoint(arch, seed=5)
    reference = T.sketch_fingerprint_of(ck, tmp_path / "base")
    for name, made in {"units": A.dead_units(ck, 4.0, 4.0, seed=6), "blocks": A.dead_blocks(ck, 4.0, seed=7)}.items():
        T.same_function(ck, made)
        result = lineage_test(T.sketch_fingerprint_of(made, tmp_path / name), reference)
        assert result.derived and result.score > 0.9, (name, result.to_dict())


def test_min_norm_probe_edit_fails_at_a_probe_seed_it_did_not_aim_at(pretrained, tmp_path):
    from tg_verify.fingerprint.tokens import id_keys

    vocab = pretrained.state[A.EMBED].shape[0]
    public = _fingerprint(pretrained, tmp_path / "base0")
    coefficients = A.probe_coefficients(public, id_keys(vocab))  # what the evader reads from the published sketch
    made = A.redraw_directions(pretrained, coefficients, seed=3, strength=1.0)
    result = lineage_test(_fingerprint(made, tmp_path / "made1", 1), _fingerprint(pretrained, tmp_path / "base1", 1))
    assert result.derived and result.score > 0.5, result.to_dict()


def test_public_seed_adaptive_fine_tune_fails_at_a_private_seed(pretrained, tmp_path):
    from bench.zoo import fine_tune

    penalty = A.SketchPenalty(pretrained, 1.0, A.library_units(None))  # aims at the public seed 0
    with one_thread():
        tuned = fine_tune(pretrained.model(), corpus("light", 100_000).long(), 40, 1e-3, 2, penalty=penalty)
    assert penalty.median(tuned, 0) < 0.1  # the attacker reached its own objective ...
    made = T.from_model(tuned)
    result = lineage_test(_fingerprint(made, tmp_path / "made1", 1), _fingerprint(pretrained, tmp_path / "base1", 1))
    assert result.derived and result.score > 0.3, result.to_dict()  # ... which says nothing about another seed


def test_public_probe_rows_redrawn_then_repaired_stay_derived(pretrained, tmp_path):
    # tgs1's 32 published rows (and an untied head's) re-drawn, then a fine-tune to win the quality back:
    # under tgs1 this evaded (0.02-0.05 on the bench); a keyed mixture of every row does not rest on them
    from bench.zoo import fine_tune

    made = A.redraw_rows(pretrained, probe_ids(512, 32, 0).tolist(), seed=4, head=True)
    with one_thread():
        repaired = T.from_model(fine_tune(made.model(), corpus("light", 100_000).long(), 30, 1e-3, 3))
    result = lineage_test(_fingerprint(repaired, tmp_path / "made"), _fingerprint(pretrained, tmp_path / "base"))
    assert result.derived and result.score > 0.5, result.to_dict()
