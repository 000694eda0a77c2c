"""Personal concepts on a seeded tiny SD model: learn, reload, real K/V loading, merge, restore, refusals."""
from dataclasses import replace
import json
import os

import numpy as np
import pytest
import torch

from diffseg_ros.core import concepts as concepts_module
from diffseg_ros.core.concepts import (KV_FILE, Concept, ConceptError, ConceptLibrary, load_concept,
                                       load_concepts, safe_folder_name, save_concept, text_attention_modules)
from diffseg_ros.core.methods.common import query_cross_maps
from diffseg_ros.core.prompts import compose_prompt
from diffseg_ros.core.sd_models import build_sd_components
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig
from diffseg_ros.core.concept_learning import ConceptTrainer, LearnSettings
from tiny_models import tiny_configs

FAST = LearnSettings(steps=3, batch=2, size=32, class_count=2, sample_steps=2, seed=0)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def sd():
    return build_sd_components(tiny_configs(), seed=0)


@pytest.fixture(scope='module')
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 32, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture(scope='module')
def learned(sd, images, tmp_path_factory):
    out = tmp_path_factory.mktemp('concepts')
    concept = ConceptTrainer(sd).learn(images, 'My Mug', 'mug', str(out), aliases=['mug of mine'],
                                       settings=FAST, show_progress=False)
    return concept, str(out)


@pytest.fixture
def library(sd):
    lib = ConceptLibrary(sd)
    yield lib
    lib.uninstall()


def perturbed(library, name, token, scale=0.5, seed=1, kv=True):
    """Make a concept whose K/V differ clearly from the base model's (a silent no-op load cannot hide)."""
    g = torch.Generator().manual_seed(seed)
    dim = library.base_embedding.weight.shape[1]
    pairs = {n: tuple(w + scale * w.std() * torch.randn(w.shape, generator=g) for w in base)
             for n, base in library.base_kv.items()} if kv else {}
    return Concept(name, 'mug', token, torch.randn(dim, generator=g) * 0.02, pairs, library.fingerprint)


def cross_maps(sd, prompt_queries, image_seed=0):
    """Per-query cross-attention maps [K, h, w] through the capture processors (what segmentation reads)."""
    seg = Segmenter(SegmenterConfig(image_size=64), components=sd)
    seg.set_queries(prompt_queries)
    rgb = np.random.default_rng(image_seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    frame = seg.attend(rgb)
    size = frame.capture.layer_size(frame.capture.cross[seg.settings.cross_layers[0]].shape[1])
    return query_cross_maps(frame.capture, seg.settings.cross_layers, frame.spans, size)[0]


def model_state(sd):
    tensors = {f'unet.{k}': v.clone() for k, v in sd.unet.state_dict().items()}
    tensors.update({f'text.{k}': v.clone() for k, v in sd.text_encoder.state_dict().items()})
    return tensors


# --- learning -----------------------------------------------------------------------------------------------
def test_learn_saves_diffusers_files_and_reloads(sd, learned):
    concept, out = learned
    folder = os.path.join(out, 'my-mug')
    assert concept.folder == folder and concept.token == '<new1>'
    assert sorted(os.listdir(folder)) == sorted(['<new1>.safetensors', KV_FILE, 'concept.json'])
    meta = json.load(open(os.path.join(folder, 'concept.json')))
    assert meta['name'] == 'My Mug' and meta['class_word'] == 'mug' and meta['aliases'] == ['mug of mine']
    assert meta['fingerprint'] == sd.fingerprint()
    assert (meta['training']['steps'], meta['training']['seed'], meta['training']['images']) == (3, 0, 3)
    again = load_concept(folder, sd.fingerprint())
    assert torch.equal(again.embedding, concept.embedding)
    assert again.kv.keys() == concept.kv.keys() == dict(text_attention_modules(sd.unet)).keys()
    for name, (k, v) in concept.kv.items():
        assert torch.equal(again.kv[name][0], k) and torch.equal(again.kv[name][1], v)
    base = dict(text_attention_modules(sd.unet))
    assert any(not torch.equal(k, base[n].to_k.weight) for n, (k, _) in concept.kv.items()), 'K must move'


def test_learning_never_touches_the_live_model(sd, images, tmp_path):
    before, vocab = model_state(sd), len(sd.tokenizer)
    trainer = ConceptTrainer(sd)
    trainer.learn(images[:2], 'cup', 'cup', str(tmp_path), settings=FAST, show_progress=False)
    after = model_state(sd)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(sd.tokenizer) == vocab


def test_size_zero_learns_at_the_size_the_model_was_trained_at(sd, images):
    # not the inference input size of diffseg_defaults.json, which may upscale frames
    concept = ConceptTrainer(sd).learn(images, 'cup', 'cup', settings=replace(FAST, size=0, class_count=0),
                                       show_progress=False)
    native = sd.unet.config.sample_size * sd.vae_scale_factor
    assert concept.training['size'] == sd.native_image_size == native


def test_learning_is_seeded(sd, images, learned):
    again = ConceptTrainer(sd).learn(images, 'My Mug', 'mug', None, settings=FAST, show_progress=False)
    assert torch.equal(again.embedding, learned[0].embedding)


# --- loading uses the learned K/V for real ------------------------------------------------------------------
def test_perturbed_kv_load_changes_weights_and_attention(sd, library, tmp_path):
    queries = ['red mug', 'blue bottle']
    base_maps = cross_maps(sd, queries)
    concept = perturbed(library, 'odd mug', '<new1>', scale=1.0)
    save_concept(concept, str(tmp_path))
    loaded = library.load_dir(str(tmp_path))
    assert [c.name for c in loaded] == ['odd mug'] and not library.errors
    modules = dict(text_attention_modules(sd.unet))
    for name, (k, v) in concept.kv.items():            # the file's K/V are in the modules, bit for bit
        assert torch.equal(modules[name].to_k.weight, k) and torch.equal(modules[name].to_v.weight, v)
    changed = cross_maps(sd, queries)
    assert relative_l1(changed, base_maps) > 0.01, 'installed K/V must change the captured attention'
    library.uninstall()
    assert torch.equal(cross_maps(sd, queries), base_maps)


def test_install_uninstall_restores_base_exactly(sd, library):
    before, tokenizer, fingerprint = model_state(sd), sd.tokenizer, sd.fingerprint()
    library.install([perturbed(library, 'a', '<new1>', seed=1), perturbed(library, 'b', '<new2>', seed=2)])
    assert sd.tokenizer('<new2> mug', add_special_tokens=False).input_ids[0] == len(tokenizer) + 1
    assert sd.fingerprint() == fingerprint                 # the base model is still the one identified
    assert any(not torch.equal(before[k], v) for k, v in model_state(sd).items())
    library.uninstall()
    after = model_state(sd)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sd.tokenizer is tokenizer and len(sd.tokenizer) == 49408


# --- several concepts in one forward ------------------------------------------------------------------------
def relative_l1(a, b):
    return float((a - b).abs().sum() / b.abs().sum())


def k_error_in_context(sd, library, concept, prompt):
    """Return |W c - W_i c| / |W_i c - W0 c| for the concept token's features c in a prompt (1 = no K/V)."""
    modules = dict(text_attention_modules(sd.unet))
    ids = sd.tokenizer(prompt).input_ids
    c = library._encode([ids])[0][ids.index(sd.tokenizer.convert_tokens_to_ids(concept.token))]
    errors = [float(((modules[n].to_k.weight.double() - k.double()) @ c).norm()
                    / ((k.double() - library.base_kv[n][0].double()) @ c).norm())
              for n, (k, _) in concept.kv.items()]
    return float(np.mean(errors))


def test_merge_of_learned_concepts_keeps_each_concept_and_the_base(sd, library, images):
    trainer = ConceptTrainer.from_library(library)
    settings = LearnSettings(steps=10, batch=2, size=32, class_count=2, sample_steps=2)
    pair = [trainer.learn(images, 'a', 'mug', None, token='<new1>', settings=settings, show_progress=False),
            trainer.learn([255 - im for im in images], 'b', 'mug', None, token='<new2>', settings=settings,
                          show_progress=False)]
    library.install(pair)
    modules = dict(text_attention_modules(sd.unet))
    for concept in pair:                      # the constrained features get (nearly) their learned outputs
        features = library.target_features(concept, pair)
        for name, (k, v) in concept.kv.items():
            base_k, base_v = library.base_kv[name]
            for merged, learned, base in ((modules[name].to_k.weight, k, base_k),
                                          (modules[name].to_v.weight, v, base_v)):
                error = (features @ (merged.double() - learned.double()).T).norm()
                change = (features @ (learned.double() - base.double()).T).norm()
                assert error < 0.25 * change
    unseen = 'a photo including <new2> mug, red <new1> mug, blue bottle.'     # a context not constrained
    errors = [k_error_in_context(sd, library, c, unseen) for c in pair]
    captions = sd.tokenizer(['a photo including red bottle, blue bowl, and tree.', 'photo of a green cup'],
                            padding='max_length', max_length=77).input_ids
    features = library._encode(captions).reshape(-1, library.base_embedding.weight.shape[1])
    drift = max(float((features @ (modules[n].to_k.weight.double() - k0.double()).T).norm()
                      / (features @ k0.double().T).norm()) for n, (k0, _) in library.base_kv.items())
    before = {n: m.to_k.weight.clone() for n, m in modules.items()}
    with library.fitted([unseen]):            # fitting the exact prompt removes most of the context error
        fitted = [k_error_in_context(sd, library, c, unseen) for c in pair]
    print(f'merged K error at the concept token of an unseen prompt {errors}, fitted to it {fitted}; '
          f'ordinary caption drift {drift:.4f}')
    assert max(errors) < 0.5 and drift < 0.1
    assert all(f <= e + 1e-6 and f < 0.2 for f, e in zip(fitted, errors))
    assert all(torch.equal(before[n], m.to_k.weight) for n, m in modules.items())


def token_confined(sd, library, pair, prompts, strength=3.0, seed=7):
    """Give each concept a K/V change acting on its own token only.

    W_i = W0 + u v^T, v orthogonal to the features of every other position of its prompt (the ideal prior
    preservation aims at).
    """
    library.install(pair, kv_concepts=[])
    g = torch.Generator().manual_seed(seed)
    for concept, prompt in zip(pair, prompts):
        ids = compose_prompt(sd.tokenizer, prompt).input_ids
        features = library._encode([ids])[0]
        position = ids.index(sd.tokenizer.convert_tokens_to_ids(concept.token))
        own, others = features[position], torch.cat([features[:position], features[position + 1:]])
        _, singular, basis = torch.linalg.svd(others, full_matrices=False)
        basis = basis[singular > 1e-6 * singular[0]]
        v = own - basis.T @ (basis @ own)
        concept.kv = {}
        for name, (k0, v0) in library.base_kv.items():
            pair_kv = []
            for w0 in (k0, v0):
                u = torch.randn(w0.shape[0], generator=g, dtype=torch.float64)
                u = strength * (w0.double() @ own).norm() * u / u.norm()
                pair_kv.append((w0.double() + torch.outer(u, v) / (v @ own)).float())
            concept.kv[name] = tuple(pair_kv)
    return pair


def test_merged_forward_matches_one_forward_per_concept():
    """Each concept's query through the merged K/V vs through its own K/V (Custom Diffusion's comparison).

    Needs a text encoder wider than the prompt (128, the embedded model's width) for concepts whose change
    is confined to their own token to exist; in the 32-wide tiny model every token's features overlap.
    """
    text, vae, unet = tiny_configs()
    text.hidden_size, text.intermediate_size, text.projection_dim = 128, 256, 128
    sd = build_sd_components((text, vae, dict(unet, cross_attention_dim=128)), seed=0)
    library = ConceptLibrary(sd)
    g = torch.Generator().manual_seed(5)
    prompts = [['<new1> mug', 'blue bottle'], ['<new2> mug', 'blue bottle']]
    pair = [Concept(n, 'mug', t, torch.randn(128, generator=g) * 0.02, {}, library.fingerprint)
            for n, t in (('a', '<new1>'), ('b', '<new2>'))]
    token_confined(sd, library, pair, prompts)
    library.install(pair, kv_concepts=[])
    no_kv = [cross_maps(sd, p)[0] for p in prompts]
    separate = []
    for concept, p in zip(pair, prompts):
        library.install(pair, kv_concepts=[concept])
        separate.append(cross_maps(sd, p)[0])
    library.install(pair)
    merged = [cross_maps(sd, p)[0] for p in prompts]
    library.uninstall()
    for i in range(2):
        merge_error, no_kv_error = relative_l1(merged[i], separate[i]), relative_l1(no_kv[i], separate[i])
        print(f'concept {i}: attention map, relative L1 to its own forward: merged {merge_error:.4f}, '
              f'without K/V {no_kv_error:.4f}')
        assert no_kv_error > 0.02 and merge_error < 0.6 * no_kv_error


# --- refusals -----------------------------------------------------------------------------------------------
def test_corrupt_pickled_and_foreign_concepts_are_refused(sd, library, learned, tmp_path, monkeypatch):
    concept, _ = learned

    def saved(name):
        folder = save_concept(Concept(name, concept.class_word, concept.token, concept.embedding, concept.kv,
                                      concept.fingerprint), str(tmp_path))
        return folder

    corrupt = saved('corrupt')
    with open(os.path.join(corrupt, KV_FILE), 'r+b') as f:
        f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"garbage": 1}')
    pickled = saved('pickled')
    torch.save(concept.kv, os.path.join(pickled, KV_FILE))                  # a pickle named .safetensors
    only_bin = saved('only bin')
    os.remove(os.path.join(only_bin, KV_FILE))
    torch.save(concept.kv, os.path.join(only_bin, 'pytorch_custom_diffusion_weights.bin'))
    foreign_sd = build_sd_components(tiny_configs(), seed=1)
    foreign = Concept('foreign', 'mug', '<new1>', concept.embedding, concept.kv, foreign_sd.fingerprint())
    save_concept(foreign, str(tmp_path))
    bad_json = saved('bad json')
    with open(os.path.join(bad_json, 'concept.json'), 'w') as f:
        f.write('{"name": "bad json", "token": "../x"')
    saved('fine')

    def no_unpickling(*args, **kwargs):
        raise AssertionError('a pickle loader was called')
    monkeypatch.setattr(torch, 'load', no_unpickling)
    loaded = library.load_dir(str(tmp_path))
    assert [c.name for c in loaded] == ['fine']
    errors = {os.path.basename(k): v for k, v in library.errors.items()}
    assert 'not a valid safetensors' in errors['corrupt']
    assert 'pickle' in errors['pickled'] and 'never loaded' in errors['pickled']
    assert 'pickle files' in errors['only-bin'] and 'never loaded' in errors['only-bin']
    assert 'trained on base model' in errors['foreign'] and 'learn it again' in errors['foreign']
    assert 'not valid JSON' in errors['bad-json']
    with pytest.raises(ConceptError, match='trained on base model'):
        load_concept(os.path.join(str(tmp_path), 'foreign'), sd.fingerprint())
    library.uninstall()


def test_names_cannot_leave_the_concepts_directory(learned, tmp_path):
    concept, _ = learned
    assert safe_folder_name("Tom's  Mug!") == 'tom-s-mug'
    for name in ('../evil', '..', 'a/b', 'a\\b', '/etc/passwd', '   ', '!!!'):
        with pytest.raises(ConceptError):
            save_concept(Concept(name, 'mug', '<new1>', concept.embedding, {}, 'x'), str(tmp_path / 'dir'))
    assert not (tmp_path / 'evil').exists()
    assert os.listdir(tmp_path / 'dir') == []


def test_interrupted_save_leaves_the_previous_concept(learned, tmp_path, monkeypatch):
    concept, _ = learned
    save_concept(concept, str(tmp_path))
    changed = Concept(concept.name, 'mug', concept.token, concept.embedding + 1, concept.kv,
                      concept.fingerprint)

    def dies_half_way(c, folder):
        concepts_module.save_file({c.token: c.embedding}, os.path.join(folder, f'{c.token}.safetensors'))
        raise KeyboardInterrupt('killed')
    monkeypatch.setattr(concepts_module, 'write_concept_files', dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_concept(changed, str(tmp_path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ['my-mug']
    assert torch.equal(load_concept(str(tmp_path / 'my-mug')).embedding, concept.embedding)

    renames = []

    def killed_between_renames(src, dst):
        renames.append(dst)
        if len(renames) == 2:                     # old folder moved aside, new one not yet in place
            raise KeyboardInterrupt('killed')
        os.replace(src, dst)
    monkeypatch.setattr(concepts_module.os, 'rename', killed_between_renames)
    with pytest.raises(KeyboardInterrupt):
        save_concept(changed, str(tmp_path))
    monkeypatch.undo()
    assert not (tmp_path / 'my-mug').exists()
    found, errors = load_concepts(str(tmp_path))            # recovers the moved-aside previous concept
    assert not errors and torch.equal(found[0].embedding, concept.embedding)
    save_concept(changed, str(tmp_path))
    assert torch.equal(load_concept(str(tmp_path / 'my-mug')).embedding, changed.embedding)
    assert os.listdir(tmp_path) == ['my-mug']


# --- queries ------------------------------------------------------------------------------------------------
def test_queries_resolve_names_aliases_and_tokens(sd, library, learned):
    library.load_dir(learned[1])
    assert library.resolve('my mug') == ('<new1> mug', library.concepts[0])
    assert library.resolve('My  MUG with dots')[0] == '<new1> mug with dots'
    assert library.resolve('the mug of mine')[0] == 'the <new1> mug'
    assert library.resolve('red <new1> mug')[0] == 'red <new1> mug'
    assert library.resolve('red bottle') == ('red bottle', None)
    assert library.resolve('my mugs')[1] is None
    assert library.find('Mug of Mine') is library.concepts[0]
    library.uninstall()


def test_concept_cli_learns_and_lists(tiny_model_dir, tmp_path, capsys):
    import cv2
    from diffseg_ros.tools.cli import main
    from diffseg_ros.tools import cli
    cli.VERBS.setdefault('concept', 'diffseg_ros.tools.concept_cli')
    shots = tmp_path / 'shots'
    shots.mkdir()
    for i in range(2):
        cv2.imwrite(str(shots / f'{i}.png'), np.full((24, 20, 3), 60 * i, np.uint8))
    out = tmp_path / 'concepts'
    assert main(['concept', 'learn', '--images', str(shots), '--name', 'my cup', '--class-word', 'cup',
                 '--out', str(out), '--model', tiny_model_dir, '--steps', '2', '--size', '32',
                 '--class-count', '1', '--sample-steps', '1', '--batch', '1']) == 0
    printed = capsys.readouterr().out
    assert 'learned' in printed and 'appearance from' in printed
    assert main(['concept', 'list', '--dir', str(out), '--model', tiny_model_dir]) == 0
    assert '"<new1> cup"' in capsys.readouterr().out
