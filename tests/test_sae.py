"""Sparse autoencoders: SAELens's file format, training from a store (streamed, resumable), quality,
scores against planted and world factors, splicing and steering through the organism, the feature view."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from safetensors import safe_open

from omnilab.analysis.sae import _aucs, cross_modal_features, sae_factor_scores
from omnilab.sae import (
    SAEError,
    SAETrainConfig,
    SparseAutoencoder,
    edited_site,
    sae_quality,
    spliced_accuracy,
    steer_feature,
    train_sae,
)
from omnilab.store import activations, layout

WIDTH = 32  # of the synthetic stores' activations


def write_store(root, samples: list[tuple[str, list[str], torch.Tensor]], site: str = "resid.0"):
    """A store of one shard: each sample (id, each token's modality, values [tokens, width])."""
    root.mkdir(parents=True, exist_ok=True)
    layout.write_meta(
        root,
        layout.new_meta(model_id="synthetic", config_hash="0", capture=[site], generate=0, manifest="-"),
    )
    ids = np.concatenate([[s] * len(m) for s, m, _ in samples]).astype(object)
    pos = np.concatenate([np.arange(len(m), dtype=np.int32) for _, m, _ in samples])
    modality = np.concatenate([m for _, m, _ in samples]).astype(object)
    n = len(ids)
    columns = {
        "sample_id": ids, "component": np.full(n, "thinker", object), "phase": np.full(n, "prefill", object),
        "step": np.zeros(n, np.int32), "pos": pos, "token_id": np.zeros(n, np.int64),
        "text": np.full(n, "", object), "modality": modality, "item": np.zeros(n, np.int32),
        "t": pos.astype(np.int64), "h": pos.astype(np.int64), "w": pos.astype(np.int64),
        "seconds": pos / 25.0, "frame": np.zeros(n, np.int32),
    }  # fmt: skip
    schema = layout.schema("tokens")
    tokens = pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)
    index = pa.table(
        {
            "sample_id": pa.array(ids, pa.string()),
            "component": pa.array(columns["component"], pa.string()),
            "phase": pa.array(columns["phase"], pa.string()),
            "step": columns["step"],
            "pos": pos,
            "row": np.arange(n, dtype=np.int64),
        }
    )
    values = torch.cat([v for _, _, v in samples]).to(torch.float16)
    layout.write_shard(root, {"tokens": tokens}, {site: (index, values)})
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A store whose rows are sparse sums of 24 known unit directions (2 active per row, magnitudes
    1-3, a little noise), and those directions."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(24, WIDTH, generator=generator)
    directions = directions / directions.norm(dim=1, keepdim=True)
    samples = []
    for s in range(40):
        rows = 60
        active = torch.stack([torch.randperm(24, generator=generator)[:2] for _ in range(rows)])
        magnitude = 1 + 2 * torch.rand(rows, 2, generator=generator)
        values = (magnitude[:, :, None] * directions[active]).sum(1) + 0.01 * torch.randn(
            rows, WIDTH, generator=generator
        )
        samples.append((f"s{s}", ["text"] * rows, values))
    root = write_store(tmp_path_factory.mktemp("planted") / "store", samples)
    return root, directions


FAST = SAETrainConfig(width=48, k=2, epochs=12, batch_size=128, lr=5e-3, chunk_rows=700, dead_after=2000)


@pytest.fixture(scope="module")
def planted_sae(planted, tmp_path_factory):
    root, _ = planted
    out = tmp_path_factory.mktemp("sae")
    return train_sae(root, "resid.0", out, FAST, device="cpu", progress=False), out


# -- the file format -------------------------------------------------------------------------------
SAELENS_TOPK_CFG = {
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
    "architecture",
    "k",
    "rescale_acts_by_decoder_norm",
}  # fmt: skip  (sae_lens 6: SAEConfig fields, TopKSAEConfig's k and rescale_acts_by_decoder_norm)


def test_saved_files_have_saelens_names_and_shapes(planted_sae):
    sae, out = planted_sae
    cfg = json.loads((out / "cfg.json").read_text())
    assert set(cfg) == SAELENS_TOPK_CFG
    assert cfg["architecture"] == "topk" and cfg["k"] == FAST.k and cfg["normalize_activations"] == "none"
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (WIDTH, FAST.width, "float32")
    assert cfg["metadata"]["hook_name"] == "resid.0" and cfg["metadata"]["model_name"] == "synthetic"
    with safe_open(str(out / "sae_weights.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert shapes == {
        "W_enc": (WIDTH, FAST.width),
        "W_dec": (FAST.width, WIDTH),
        "b_enc": (FAST.width,),
        "b_dec": (WIDTH,),
    }
    loaded = SparseAutoencoder.load(out)
    x = torch.randn(5, WIDTH)
    assert torch.equal(loaded(x), sae(x)) and loaded.site == "resid.0"


def test_load_reads_saelens_own_topk_file_with_decoder_norm_rescaling(tmp_path):
    """SAELens's TopKSAE with rescale_acts_by_decoder_norm: pre = ((x - b_dec) W_enc + b_enc) * |W_dec|,
    topk, then (acts / |W_dec|) W_dec + b_dec; written by hand as its save_model writes it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    d_in, d_sae, k = 6, 10, 3
    w_enc, w_dec = torch.randn(d_in, d_sae, generator=g), 3 * torch.randn(d_sae, d_in, generator=g)
    b_enc, b_dec = torch.randn(d_sae, generator=g), torch.randn(d_in, generator=g)
    save_file(
        {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": b_dec},
        str(tmp_path / "sae_weights.safetensors"),
    )
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": "topk", "k": k,
           "rescale_acts_by_decoder_norm": True, "metadata": {"hook_name": "blocks.0.hook_resid_post"}}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    x = torch.randn(7, d_in, generator=g)
    norms = w_dec.norm(dim=1)
    pre = ((x - b_dec) @ w_enc + b_enc) * norms
    values, index = pre.topk(k, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, index, values.relu())
    expected = (acts / norms) @ w_dec + b_dec
    sae = SparseAutoencoder.load(tmp_path)
    assert torch.allclose(sae(x), expected, atol=1e-5) and sae.site == "blocks.0.hook_resid_post"


def test_load_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(SAEError, match="cfg.json"):
        SparseAutoencoder.load(tmp_path)
    SparseAutoencoder(4, 8, k=2).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAEError, match="gated"):
        SparseAutoencoder.load(tmp_path)


# -- training --------------------------------------------------------------------------------------
def test_topk_sae_finds_the_planted_directions(planted, planted_sae):
    root, directions = planted
    sae, out = planted_sae
    quality = sae_quality(sae, root)
    assert quality["fve"] >= 0.9 and FAST.k - 0.1 <= quality["l0"] <= FAST.k
    cosine = directions @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T.detach()
    assert (cosine.max(dim=1).values > 0.9).float().mean() >= 0.9  # each planted direction has a feature
    assert json.loads((out / "training.json").read_text())["steps"] == len(
        json.loads((out / "training.json").read_text())["history"]
    )


def test_training_streams_the_store_in_chunks(planted, tmp_path, monkeypatch):
    import importlib

    reader = importlib.import_module(
        "omnilab.store.activations"
    )  # the module (the package exports a function)
    sizes = []
    original = reader.read_rows
    monkeypatch.setattr(
        reader, "read_rows", lambda path, rows, lay=None: sizes.append(len(rows)) or original(path, rows, lay)
    )
    config = SAETrainConfig(width=16, k=2, epochs=1, batch_size=100, chunk_rows=300)
    train_sae(planted[0], "resid.0", tmp_path, config, device="cpu", progress=False)
    assert sizes and max(sizes) <= 300 and sum(sizes) >= 2 * 2400  # the mean pass, then one epoch


def test_an_interrupted_run_resumes_bit_for_bit(planted, tmp_path):
    config = SAETrainConfig(width=16, k=2, epochs=2, batch_size=200, chunk_rows=500, save_every=5)
    whole = train_sae(planted[0], "resid.0", tmp_path / "whole", config, device="cpu", progress=False)
    train_sae(planted[0], "resid.0", tmp_path / "cut", config, device="cpu", progress=False, until=7)
    assert not (tmp_path / "cut" / "cfg.json").exists()  # stopped early: only the checkpoint
    resumed = train_sae(planted[0], "resid.0", tmp_path / "cut", config, device="cpu", progress=False)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(whole, name), getattr(resumed, name)), name
    with pytest.raises(SAEError, match="another run"):
        train_sae(planted[0], "resid.0", tmp_path / "cut", SAETrainConfig(width=8, k=2), progress=False)


def test_batchtopk_trains_and_saves_as_jumprelu(planted, tmp_path):
    config = SAETrainConfig(width=48, k=2, epochs=6, batch_size=128, lr=5e-3, architecture="batchtopk")
    sae = train_sae(planted[0], "resid.0", tmp_path, config, device="cpu", progress=False)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and "k" not in cfg
    with safe_open(str(tmp_path / "sae_weights.safetensors"), "pt") as f:
        assert tuple(f.get_slice("threshold").get_shape()) == (48,)
    quality = sae_quality(SparseAutoencoder.load(tmp_path), planted[0])
    assert float(sae.threshold.min()) > 0 and 0.5 * config.k <= quality["l0"] <= 2 * config.k
    assert quality["fve"] >= 0.8


def test_cli_trains_an_sae_and_prints_its_quality(planted, tmp_path, capsys):
    from omnilab.cli import main

    code = main(["sae", "train", "--store", str(planted[0]), "--site", "resid.0", "--width", "16", "--k", "2",
                 "--epochs", "1", "--out", str(tmp_path / "cli"), "--no-progress", "--device", "cpu"])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert {"fve", "l0", "dead", "dense"} <= set(printed) and 1 < printed["l0"] <= 2
    assert SparseAutoencoder.load(tmp_path / "cli").d_sae == 16


# -- scores against factors ------------------------------------------------------------------------
def test_auc_counts_ties_as_half_like_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 3)).astype(float)
    labels = rng.random(50) < 0.4
    expected = [roc_auc_score(labels, scores[:, j]) for j in range(3)]
    assert np.allclose(_aucs(scores, labels), expected)


@pytest.fixture(scope="module")
def planted_factors(tmp_path_factory):
    """Image and speech samples: red ones carry direction 0 on one media token, blue ones direction 1
    (the same directions in pictures and in audio); text tokens are noise. An SAE whose first two
    decoder rows are those directions."""
    g = torch.Generator().manual_seed(2)
    directions = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=g))[0].T[:8]
    samples, facts = [], []
    for s in range(48):
        task, media = ("image", "image") if s % 2 else ("speech", "audio")
        colour = ("red", "blue")[(s // 2) % 2]
        values = 0.3 * torch.randn(7, WIDTH, generator=g)
        values[1] += 3.0 * directions[0 if colour == "red" else 1]
        samples.append((f"{task}-{s}", ["text", media, media, media, media, "text", "text"], values))
        facts.append({"sample_id": f"{task}-{s}", "task": task, "factor": "colour", "value": colour})
    root = write_store(tmp_path_factory.mktemp("factors") / "store", samples)
    sae = SparseAutoencoder(WIDTH, 8, k=2, metadata={"hook_name": "resid.0"})
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
    return root, pd.DataFrame(facts), sae


def test_factor_scores_find_the_planted_feature_and_beat_the_baselines(planted_factors):
    root, factors, sae = planted_factors
    scores = sae_factor_scores(sae, root, factors)
    assert set(scores["source"]) == {"sae", "random", "neuron"}
    own = scores[scores["own"]].set_index(["source", "task", "value"])
    for task in ("image", "speech"):
        for value, feature in (("red", 0), ("blue", 1)):
            best = own.loc[("sae", task, value)]
            assert best["feature"] == feature and best["auc"] == 1.0 and best["precision"] == 1.0
            assert own.loc[("random", task, value), "auc"] <= 1.0
    assert set(scores.loc[scores["own"], "modality"]) == {"image", "audio"}
    text = scores[(scores["source"] == "sae") & (scores["modality"] == "text")]
    assert (text["auc"] < 0.9).all()  # nothing planted on the text tokens


def test_cross_modal_features_are_the_planted_shared_directions(planted_factors):
    root, factors, sae = planted_factors
    shared = cross_modal_features(sae, root, factors)
    ours = shared[shared["source"] == "sae"].set_index("value")
    assert ours.loc["red", "feature"] == 0 and ours.loc["blue", "feature"] == 1
    assert set(ours["modalities"]) == {"audio, image"}


def test_steering_edit_moves_only_along_the_feature():
    sae = SparseAutoencoder(WIDTH, 16, k=4)
    hidden = torch.randn(5, WIDTH)
    edited = edited_site(sae, hidden, 3, value=7.0)
    delta = edited - hidden
    assert torch.allclose(
        delta, (7.0 - sae.encode(hidden)[:, 3])[:, None] * sae.W_dec[3].detach()[None], atol=1e-5
    )
    assert torch.equal(edited_site(sae, hidden, 3, scale=1.0), hidden)
    with pytest.raises(SAEError, match="exactly one"):
        edited_site(sae, hidden, 3)


# -- on the organism ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def organism():
    import omnilab

    return omnilab.load("organism", talker=False)


@pytest.fixture(scope="module")
def world_store(organism, tmp_path_factory):
    """Two examples of each factor-carrying task of the world, collected with resid.1."""
    from omnilab.sae import collect_world, draw_world

    folder = tmp_path_factory.mktemp("world")
    examples = draw_world(10, seed=21, folder=folder / "draw")
    return collect_world(organism, examples, folder / "store", sites=("resid.1",), progress=False), examples


def test_world_factors_are_the_examples_facts(world_store):
    from omnilab.sae import example_factors, world_factors

    store, examples = world_store
    factors = world_factors(store)
    expected = {
        (f"{e.task}-{i}", factor, value)
        for i, e in enumerate(examples)
        for factor, value in example_factors(e.task, e.facts).items()
    }
    assert set(zip(factors["sample_id"], factors["factor"], factors["value"], strict=True)) == expected
    assert {"colour", "shape", "direction", "second"} <= set(factors["factor"])


def _exact_sae(d_in: int) -> SparseAutoencoder:
    """An SAE that reconstructs exactly: features [x, -x] with k = d_in keep each coordinate's sign."""
    sae = SparseAutoencoder(d_in, 2 * d_in, k=d_in, metadata={"hook_name": "resid.1"})
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_dec.zero_()
    return sae


def test_an_exact_reconstruction_spliced_in_changes_nothing(organism, world_store):
    _, examples = world_store
    sae = _exact_sae(organism.thinker.config.text_config.hidden_size)
    table = spliced_accuracy(organism, sae, examples[:5]).set_index("task")
    assert table.loc["all", "n"] == 5
    assert table.loc["all", "spliced"] == table.loc["all", "clean"]
    assert table.loc["all", "spliced_loss"] == pytest.approx(table.loc["all", "clean_loss"], abs=1e-3)
    broken = SparseAutoencoder(sae.d_in, 8, k=2, metadata={"hook_name": "resid.1"})  # a random SAE
    worse = spliced_accuracy(organism, broken, examples[:5]).set_index("task")
    assert worse.loc["all", "spliced_loss"] > table.loc["all", "clean_loss"] + 0.5


def test_an_sae_trained_on_the_organism_reconstructs_its_residual(world_store, tmp_path):
    store, _ = world_store
    config = SAETrainConfig(width=128, k=8, epochs=30, batch_size=128)
    sae = train_sae(store, "resid.1", tmp_path, config, device="cpu", progress=False)
    quality = sae_quality(sae, store)
    assert quality["fve"] >= 0.9 and 4 < quality["l0"] <= 8  # topk: at most k (a kept value may be <= 0)
    assert quality["rows"] == len(activations(store, "resid.1", where="component = 'thinker'"))


def test_steering_by_an_unchanged_feature_keeps_every_answer(organism, world_store):
    _, examples = world_store
    sae = _exact_sae(organism.thinker.config.text_config.hidden_size)
    same = steer_feature(organism, sae, 0, examples[:3], lambda e: e.answer, scale=1.0)
    assert list(same["rows"]["steered"]) == list(same["rows"]["baseline"])
    assert same["success"]["n"] == 3 and 0 <= same["success"]["low"] <= same["success"]["rate"]
    flooded = steer_feature(organism, sae, 0, examples[:3], lambda e: e.answer, value=1e4)
    assert not flooded["rows"]["steered"].any()  # a feature clamped far past any activation breaks it
    on_images = steer_feature(organism, sae, 0, examples[:3], lambda e: e.answer, value=1e4, modality="image")
    rows = on_images["rows"].set_index("task")
    assert list(rows.index) == ["text", "speech", "image"]
    # inputs without a picture are untouched (flooded everywhere, they broke); the picture's own answer
    # may survive: by resid.1 the organism has already read the image into later positions
    assert (rows.loc[["text", "speech"], "steered"] == rows.loc[["text", "speech"], "baseline"]).all()


# -- the feature view ------------------------------------------------------------------------------
def test_feature_explorer_follows_the_chosen_feature(planted_factors):
    from omnilab.widgets.features import FeatureExplorer

    root, factors, sae = planted_factors
    colour = factors.set_index("sample_id")["value"]
    explorer = FeatureExplorer(sae, root, feature=0, factors=factors, top=5)
    shown = [s for s in colour.index if f"<b>{s}</b>" in explorer.examples.value]
    assert len(shown) == 5 and set(colour[shown]) == {"red"}
    own = explorer.factor_table.query("own and value == 'red'")
    assert (own["auc"] == 1.0).all() and len(explorer.aucs.data) == 3  # audio, image, text bars
    explorer.feature.value = 1
    shown = [s for s in colour.index if f"<b>{s}</b>" in explorer.examples.value]
    assert set(colour[shown]) == {"blue"}


def test_feature_explorer_on_the_organism_shows_media_and_a_chosen_input(organism, world_store):
    from omnilab.widgets.features import FeatureExplorer

    store, examples = world_store
    sae = _exact_sae(organism.thinker.config.text_config.hidden_size)
    image = next(e for e in examples if e.task == "image")
    explorer = FeatureExplorer(sae, store, feature=0, lab=organism, conversation=image.conversation, top=10)
    assert any(tag in explorer.examples.value for tag in ("<img", "<audio", "<video"))
    prompt = organism.prepare(image.conversation)["input_ids"].shape[1]
    assert len(explorer.token_table) == prompt and "image" in set(explorer.token_table["modality"])
    assert sum(len(bar.x) for bar in explorer.tokens.data) == prompt
