"""The main job's plumbing end to end with a handful of steps (the real run is README's first command)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'train_scripts'))

import main_job  # noqa: E402
from vit_moe.onnx import read_metadata  # noqa: E402


def test_main_job_trains_dense_upcycles_continues_both_and_reports(tmp_path, capsys):
    main_job.main(['--output', str(tmp_path), '--dense-steps', '3', '--extra-steps', '2', '--no-progress',
                   '--bench-rounds', '1'])
    table = (tmp_path / 'results.md').read_text()
    rows = [line for line in table.split('\n\n')[0].splitlines() if line.startswith('| ') and 'model' not in line]
    assert [r.split('|')[1].strip() for r in rows] == ['dense', 'MoE (upcycled)', 'dense (continued)']
    dense_params, moe_params = float(rows[0].split('|')[3]), float(rows[1].split('|')[3])
    assert moe_params > 2 * dense_params  # 8 experts in 3 of 6 blocks
    assert [r.split('|')[2].strip() for r in rows] == ['3', '2', '2']
    for run in ('dense', 'moe', 'dense_continued'):
        assert (tmp_path / run / 'model' / 'model.safetensors').is_file()
    assert len(list((tmp_path / 'data' / 'val').glob('*/*.png'))) == 359  # 20 % of the 1797 digits
    assert 'outputs in' in capsys.readouterr().out
    report = table.split('\n\n', 1)[1]
    assert report.count('top-1 agreement 1.00') == 3
    variants = {tuple(c.strip() for c in line.split('|')[1:3]): [c.strip() for c in line.split('|')[3:7]]
                for line in report.splitlines() if line.startswith(('| dense | ', '| moe | '))}
    assert set(variants) == {('dense', 'fp32'), ('dense', 'int8'), ('moe', 'fp32'), ('moe', 'int8'),
                             ('moe', 'int4-experts (QMoE)')}
    mb, ort_top1, torch_top1, agreement = variants['moe', 'fp32']
    assert ort_top1 == torch_top1 and agreement == '100.00%'  # the float graph is exact on the 359 real images
    assert float(variants['moe', 'int8'][0]) < 0.5 * float(mb)  # int8 weights
    int4_mb, int4_top1, _, int4_agreement = variants['moe', 'int4-experts (QMoE)']
    assert float(int4_mb) < 0.8 * float(variants['moe', 'int8'][0])  # 4-bit experts: 2.1 MB against 2.9
    recorded = read_metadata(tmp_path / 'onnx' / 'moe.int4-experts.onnx')
    assert (recorded['expert_kernel'], recorded['expert_bits']) == ('qmoe', 4)
    assert float(int4_agreement.rstrip('%')) >= 90.0  # scored on the same images against the float32 model
    assert '| 32 | moe | onnxruntime int8 |' in report and 'moe / dense (onnxruntime int8)' in report
    assert (tmp_path / 'onnx' / 'moe.int8.onnx').is_file()
    assert 'Routing report: ' in table and (tmp_path / 'routing_report' / 'report.md').is_file()
    assert len(list((tmp_path / 'routing_report').glob('*.png'))) >= 4


def test_a_new_main_job_replaces_only_what_an_earlier_main_job_wrote(tmp_path, capsys):
    (tmp_path / 'mine' / 'dense').mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds dense that the main job did not write"):
        main_job.start_fresh(str(tmp_path / 'mine'))
    assert (tmp_path / 'mine' / 'dense').is_dir()  # the user's folder is left alone
    out = tmp_path / 'job'
    main_job.start_fresh(str(out))  # a first main job marks the folder as its own
    for name in ('dense', 'moe', 'data'):
        (out / name).mkdir()
        (out / name / 'x').write_text('x')
    main_job.start_fresh(str(out))
    assert sorted(p.name for p in out.iterdir()) == ['.main_job', 'data']  # runs removed, the data kept
    assert 'removed the previous main job' in capsys.readouterr().out
