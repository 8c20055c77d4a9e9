"""Routing report (vit_moe.analysis, train_scripts/routing_report.py): statistics exact on hand-made routings and
true by construction on real routers (hypothesis), an end-to-end report whose numbers match the routing captured
directly, and the command line (a report; one-line errors for a dense model and a missing folder)."""
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vit_moe import _cli
from vit_moe.analysis import (
    BACKGROUND, OBJECT, PREFIX, LayerStats, compute_layer_stats, load_report_models, patch_categories, routing_report,
)
from vit_moe.data import ImageFolderDataset, build_transforms, data_config_for
from vit_moe.layers import ExpertChoiceRouter, MoeConfig, TokenChoiceRouter, capture_routing
from vit_moe.models import save_trained_model

from conftest import ROOT, make_image_folder, run_front_end

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_experts=4, moe_blocks=1, num_classes=3)
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
P, BG, OB = PREFIX, BACKGROUND, OBJECT


def _tiny_moe(seed=0, **overrides):
    torch.manual_seed(seed)
    return timm.create_model('vit_ti16_moe_upcycled', **dict(TINY, **overrides)).eval()


def _square_folder(root: Path, per_class=3, classes=3, size=16) -> Path:
    """val/class_k/*.png: black images with a bright square whose place depends on the class (object patches) and
    on the image."""
    for k in range(classes):
        folder = root / 'val' / f'class_{k}'
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.zeros((size, size, 3), dtype=np.uint8)
            y, x = 4 * (k % 2) + (i % 2) * 4, 4 * (k // 2) + (i // 2) * 4
            pixels[y:y + 6, x:x + 6] = 230
            Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


# --- statistics on hand-made routings (exact) ---------------------------------------------------------------------

def _hand_made_expert_choice():
    """2 images, 3 experts, capacity 2, 5 tokens (class token + 2x2 patches)."""
    token_index = torch.tensor([[[1, 2], [1, 3], [0, 1]],
                                [[4, 3], [4, 2], [4, 1]]])
    combine = torch.tensor([[[0.5, 0.25], [0.125, 0.375], [0.75, 0.0625]],
                            [[0.5, 0.5], [0.25, 0.125], [0.625, 0.375]]])
    probs = torch.stack([torch.tensor([0.5, 0.25, 0.25]).expand(5, 3), torch.tensor([0.25, 0.25, 0.5]).expand(5, 3)])
    targets = torch.tensor([1, 0])
    categories = torch.tensor([[P, BG, OB, OB, BG], [P, OB, BG, BG, OB]])
    return token_index, combine, probs, targets, categories


def test_expert_choice_statistics_of_a_hand_made_routing_are_exact():
    token_index, combine, probs, targets, categories = _hand_made_expert_choice()
    stats = LayerStats(3, 5, 1, (2, 2), 2, expert_choice=True, num_bins=4)
    per_image = stats.update(token_index, combine, probs, targets, categories)
    r = stats.result()
    # experts per token: image 0 [1, 3, 1, 1, 0], image 1 [0, 1, 1, 1, 3]
    assert per_image['counts'].tolist() == [[1, 3, 1, 1, 0], [0, 1, 1, 1, 3]]
    assert r['experts_per_token'] == dict(all=[2, 6, 0, 2], prefix=[1, 1, 0, 0], background=[1, 2, 0, 1],
                                          object=[0, 3, 0, 1])
    assert r['num_tokens_by_category'] == dict(all=10, prefix=2, background=4, object=4)
    assert r['unprocessed_fraction'] == dict(all=0.2, prefix=0.5, background=0.25, object=0.0)
    assert r['mean_experts_per_token'] == dict(all=1.2, prefix=0.5, background=1.25, object=1.5)
    assert r['unprocessed_map'] == [[0.0, 0.0], [0.0, 0.5]]
    assert r['mean_experts_map'] == [[2.0, 1.0], [1.0, 1.5]]
    assert per_image['top_expert'].tolist() == [[2, 0, 0, 1, -1], [-1, 2, 1, 0, 2]]
    pc = r['per_class']  # class 0 = image 1, class 1 = image 0
    assert pc['assignments'] == [[2, 2], [2, 2], [2, 2]]
    assert pc['load'] == [[1 / 3, 1 / 3]] * 3
    assert pc['importance'] == [[0.25, 0.5], [0.25, 0.25], [0.5, 0.25]]
    np.testing.assert_allclose(pc['combine_weight'], [[1 / 2.375, 0.75 / 2.0625], [0.375 / 2.375, 0.5 / 2.0625],
                                                      [1 / 2.375, 0.8125 / 2.0625]], rtol=1e-12)
    assert pc['num_images'] == [1, 1]
    assert r['expert_importance'] == [0.375, 0.25, 0.375]
    cw = r['combine_weights']
    assert cw['bin_edges'] == [0.0, 0.25, 0.5, 0.75, 1.0] and cw['counts'] == [3, 4, 4, 1]
    assert (cw['num_slots'], cw['num_filled'], cw['min'], cw['max']) == (12, 12, 0.0625, 0.75)
    assert cw['mean'] == pytest.approx(4.4375 / 12, rel=1e-12)
    assert (r['capacity'], r['router'], r['num_images']) == (2, 'expert_choice', 2)


def test_token_choice_empty_slots_are_not_counted():
    # 1 image, 2 experts, capacity 3; empty slots have weight 0 and token index 0, while e1 really holds token 0
    token_index = torch.tensor([[[1, 2, 0], [2, 0, 0]]])
    combine = torch.tensor([[[0.5, 0.25, 0.0], [0.75, 0.5, 0.0]]])
    probs = torch.full((1, 5, 2), 0.5)
    categories = torch.tensor([[P, OB, OB, BG, BG]])
    stats = LayerStats(2, 5, 1, (2, 2), 1, expert_choice=False, num_bins=4)
    per_image = stats.update(token_index, combine, probs, torch.tensor([0]), categories)
    r = stats.result()
    assert per_image['counts'].tolist() == [[1, 1, 2, 0, 0]]
    assert per_image['top_expert'].tolist() == [[1, 0, 1, -1, -1]]
    assert r['experts_per_token']['all'] == [2, 2, 1]
    assert r['unprocessed_fraction'] == dict(all=0.4, prefix=0.0, background=1.0, object=0.0)
    assert r['per_class']['assignments'] == [[2], [2]] and r['per_class']['load'] == [[0.5], [0.5]]
    assert r['combine_weights']['counts'] == [0, 1, 2, 1]  # 0.25 | 0.5, 0.5 | 0.75
    assert (r['combine_weights']['num_filled'], r['combine_weights']['num_slots']) == (4, 6)
    assert r['router'] == 'token_choice'


def test_patch_categories_by_mean_intensity_on_a_non_square_image():
    images = torch.zeros(1, 3, 4, 6)  # 2x3 patches of 2x2 pixels
    images[0, :, 0:2, 2:4] = 1.0  # patch (0, 1): bright
    images[0, 0, 2:4, 4:6] = 0.5  # patch (1, 2): red channel half -> mean 1/6
    categories = patch_categories(images, (2, 2), num_prefix_tokens=1, background_threshold=0.1)
    assert categories.tolist() == [[P, BG, OB, BG, BG, BG, OB]]
    assert patch_categories(images, (2, 2), 0, 0.2).tolist() == [[BG, OB, BG, BG, BG, BG]]


# --- properties on real routers ---------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), experts=st.integers(1, 6), gh=st.integers(1, 3), gw=st.integers(1, 3),
       prefix=st.integers(0, 2), factor=st.sampled_from([0.5, 1.0, 2.0, 3.0]), classes=st.integers(1, 3),
       token_choice=st.booleans(), top_k=st.integers(1, 2), split=st.integers(0, 4), seed=st.integers(0, 2 ** 16))
def test_counts_add_up_for_real_routings(batch, experts, gh, gw, prefix, factor, classes, token_choice, top_k, split,
                                         seed):
    T = prefix + gh * gw
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if token_choice:
        router = TokenChoiceRouter(8, MoeConfig(router='token_choice', num_experts=experts, capacity_factor=factor,
                                                top_k=min(top_k, experts)))
    else:
        router = ExpertChoiceRouter(8, MoeConfig(num_experts=experts, capacity_factor=factor))
    routing = router(torch.randn(batch, T, 8, generator=g))
    targets = torch.randint(0, classes, (batch,), generator=g)
    categories = torch.cat([torch.full((batch, prefix), P), torch.randint(1, 3, (batch, gh * gw), generator=g)], 1)
    args = (routing.token_index, routing.combine_weights, routing.probs, targets, categories)
    r = compute_layer_stats(*args, prefix, (gh, gw), classes, expert_choice=not token_choice)
    E, capacity = experts, routing.token_index.shape[2]
    hist = np.array(r['experts_per_token']['all'])
    filled = int((routing.combine_weights != 0).sum()) if token_choice else E * capacity * batch
    assert hist.sum() == T * batch  # tokens taken by 0 experts + by >= 1 == T x images
    assert (hist * np.arange(E + 1)).sum() == filled  # expert choice: == E x capacity x images
    assert r['combine_weights']['num_filled'] == sum(r['combine_weights']['counts']) == filled
    by_category = sum(np.array(r['experts_per_token'][k]) for k in ('prefix', 'background', 'object'))
    assert by_category.tolist() == hist.tolist()
    if token_choice:
        assert hist[router.top_k + 1:].sum() == 0  # a token goes to at most top_k experts
    counts = np.bincount(targets.numpy(), minlength=classes)
    assignments = np.array(r['per_class']['assignments'])
    assert assignments.sum() == filled
    for c in range(classes):
        if counts[c] == 0:
            assert r['per_class']['importance'][0][c] is None
            continue
        assert sum(row[c] for row in r['per_class']['importance']) == pytest.approx(1.0)
        assert sum(row[c] for row in r['per_class']['load']) == pytest.approx(1.0)
        assert sum(row[c] for row in r['per_class']['combine_weight']) == pytest.approx(1.0)
        if not token_choice:
            assert assignments[:, c].tolist() == [counts[c] * capacity] * E  # every expert fills its slots
    # accumulating two batches gives the numbers of the whole batch
    cut = min(split, batch)
    stats = LayerStats(E, T, prefix, (gh, gw), classes, expert_choice=not token_choice)
    for part in (slice(0, cut), slice(cut, batch)):
        if part.stop > part.start:
            stats.update(*(a[part] for a in args))
    both = stats.result()
    for key in ('experts_per_token', 'num_tokens_by_category', 'unprocessed_fraction', 'unprocessed_map'):
        assert both[key] == r[key]
    assert both['per_class']['assignments'] == r['per_class']['assignments']
    assert both['combine_weights']['counts'] == r['combine_weights']['counts']


# --- end to end -------------------------------------------------------------------------------------------------

def _direct_counts(model, data_dir, threshold):
    """Experts per token and token categories computed here by plain loops from a direct capture of the same images."""
    cfg = data_config_for(model)
    dataset = ImageFolderDataset(str(data_dir), 'val', transform=build_transforms(cfg, None, is_training=False),
                                 substitute_unreadable=False)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad(), capture_routing(keep_tensors=True) as cap:
        logits = model(images)
    (name, routing), = cap.tensors
    shown = images * torch.tensor(cfg['std']).view(1, 3, 1, 1) + torch.tensor(cfg['mean']).view(1, 3, 1, 1)
    hist = {k: [0] * 5 for k in ('all', 'prefix', 'background', 'object')}
    for b in range(len(images)):
        for t in range(17):
            k = sum(t in routing.token_index[b, e].tolist() for e in range(4))
            if t == 0:
                category = 'prefix'
            else:
                y, x = divmod(t - 1, 4)
                patch = shown[b, :, 4 * y:4 * y + 4, 4 * x:4 * x + 4].clamp(0, 1)
                category = 'background' if patch.mean() < threshold else 'object'
            hist['all'][k] += 1
            hist[category][k] += 1
    top1 = 100.0 * float((logits.argmax(-1) == targets).float().mean())
    return name, hist, routing, top1


def _check_png(path: Path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as img:
        img.verify()


def test_report_writes_figures_markdown_and_json_with_the_numbers_of_a_direct_capture(tmp_path):
    data = _square_folder(tmp_path / 'data')
    model, start = _tiny_moe(0), _tiny_moe(1)
    out = tmp_path / 'report'
    result = routing_report(model, str(data), str(out), start_model=start, num_example_images=3, experts_shown=2,
                            batch_size=4, progress=False, background_threshold=0.1)
    name, hist, routing, top1 = _direct_counts(model, data, 0.1)
    assert list(result['layers']) == [name] == ['blocks.1.mlp']
    layer = result['layers'][name]
    assert layer['experts_per_token'] == hist
    assert sum(hist['background']) > 0 and sum(hist['object']) > 0  # the squares make both kinds
    assert (layer['capacity'], layer['num_tokens'], layer['grid']) == (routing.token_index.shape[2], 17, [4, 4])
    assert layer['num_images'] == result['num_images'] == 9 and result['top1'] == pytest.approx(top1)
    assert result['start_layers'][name]['experts_per_token'] != hist  # another router: other choices
    assert result['experts_shown'][name] == sorted(range(4), key=lambda e: -layer['expert_importance'][e])[:2]

    saved = json.loads((out / 'report.json').read_text())
    assert saved == json.loads(json.dumps(result))
    md = (out / 'report.md').read_text()
    links = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', md)
    assert set(links) == {'coverage.png', 'combine_weights.png', 'classes_blocks_1_mlp.png',
                          'examples_blocks_1_mlp.png'}
    for link in links:
        _check_png(out / link)
    assert sorted(p.name for p in out.glob('*.png')) == sorted(links)
    unprocessed = f'{100 * result["start_layers"][name]["unprocessed_fraction"]["all"]:.1f} % -> ' \
                  f'{100 * layer["unprocessed_fraction"]["all"]:.1f} %'
    assert f'| {name} | {unprocessed} |' in md and 'below 0.1' in md


def test_report_on_token_choice_and_a_non_square_input(tmp_path):
    data = _square_folder(tmp_path / 'data', per_class=2, size=20)
    model = _tiny_moe(0, img_size=(16, 24), router='token_choice', top_k=1)
    result = routing_report(model, str(data), str(tmp_path / 'report'), num_example_images=2, progress=False)
    layer = result['layers']['blocks.1.mlp']
    assert result['input_size'] == [3, 16, 24] and layer['grid'] == [4, 6] and layer['router'] == 'token_choice'
    assert max(k for k, v in enumerate(layer['experts_per_token']['all']) if v) <= 1  # top-1: one expert at most
    assert layer['combine_weights']['num_filled'] == sum(k * v for k, v in enumerate(layer['experts_per_token']['all']))
    for name in ('coverage.png', 'combine_weights.png', 'classes_blocks_1_mlp.png', 'examples_blocks_1_mlp.png'):
        _check_png(tmp_path / 'report' / name)


def test_a_dense_model_is_refused_naming_it(tmp_path):
    dense = timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="model 'vit_tiny_patch16_224' has no MoE layer"):
        routing_report(dense, str(tmp_path), str(tmp_path / 'report'), progress=False)
    assert not (tmp_path / 'report').exists()


def test_a_missing_matplotlib_names_the_report_extra_before_reading_data(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(ImportError, match=r'matplotlib.*vit-moe\[report\]'):
        routing_report(_tiny_moe(), str(tmp_path / 'missing'), str(tmp_path / 'report'), progress=False)


# --- command line -----------------------------------------------------------------------------------------------

def _cli_main():
    spec = importlib.util.spec_from_file_location('routing_report_cli', ROOT / 'train_scripts' / 'routing_report.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_command_line_report_with_a_start_checkpoint(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=(1, 3), size=16)
    dense_kwargs = {k: v for k, v in TINY.items() if k not in ('num_experts', 'moe_blocks')}
    torch.manual_seed(0)
    dense = timm.create_model('vit_tiny_patch16_224', **dense_kwargs)
    labels = ['class_0', 'class_1', 'class_2']
    save_trained_model(dense, tmp_path / 'dense', label_names=labels, data_config=data_config_for(dense),
                       model_args=dense_kwargs)
    moe_args = {k: v for k, v in TINY.items() if k != 'num_classes'}
    torch.manual_seed(0)  # as the trainer seeds before building the model it upcycles
    moe, _ = load_report_models('vit_ti16_moe_upcycled', str(tmp_path / 'dense'), model_kwargs=moe_args)
    save_trained_model(moe, tmp_path / 'moe', label_names=labels, data_config=data_config_for(moe))
    out = tmp_path / 'report'
    returncode, stdout, stderr = run_front_end(  # the command line's main, in this process
        'train_scripts/routing_report.py', '--model', 'vit_ti16_moe_upcycled', '--checkpoint', str(tmp_path / 'moe'),
        '--start-checkpoint', str(tmp_path / 'dense'), '--data-dir', str(data), '--output', str(out), '--examples', '2',
        '--no-progress')
    assert returncode == 0, stderr[-3000:]
    assert 'blocks.1.mlp: ' in stdout and f'report: {out}/report.md' in stdout
    report = json.loads((out / 'report.json').read_text())
    # the start is the dense folder upcycled with the model's arguments: every expert a copy, the trainer's seed
    assert report['start_checkpoint'] == str(tmp_path / 'dense') and report['start_layers'] is not None
    assert report['layers'] == report['start_layers']  # the saved model is that very upcycled start
    assert report['class_names'] == labels and (out / 'report.md').is_file()


@pytest.mark.parametrize('case', ['dense model', 'missing folder'])
def test_command_line_mistakes_are_one_line(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv(_cli.DEBUG_ENV, raising=False)
    data = tmp_path / 'missing'
    model = 'vit_ti16_moe_upcycled'
    if case == 'dense model':
        data = make_image_folder(tmp_path / 'data', per_class=(1, 1))
        model = 'vit_tiny_patch16_224'
    argv = ['--model', model, '--model-kwargs', '{img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}',
            '--data-dir', str(data), '--output', str(tmp_path / 'report')]
    assert _cli.run(_cli_main(), argv, prog='routing_report.py') == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = ("model 'vit_tiny_patch16_224' has no MoE layer" if case == 'dense model'
                else f"data_dir '{data}' does not exist")
    assert len(lines) == 1 and lines[0].startswith('routing_report.py: error: ') and expected in lines[0], lines
