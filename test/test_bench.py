"""`diffseg bench` reports what the issues measure: pipeline vs bare, UNet part vs a full UNet forward.

Timings are not asserted (they swing between runs); the report's fields and what they are made of are.
"""
from diffseg_ros.tools.bench import print_report, run_bench
from tiny_models import save_tiny_layout


def test_bench_reports_the_unet_part_against_a_full_forward(tmp_path, capsys):
    folder = save_tiny_layout('sd1', str(tmp_path / 'sd1'))
    report = run_bench(size=64, repeats=1, methods=('cross', 't2m'), model_path=folder)
    for method, m in report['methods'].items():
        for key in ('pipeline_over_bare', 'unet_over_full_unet', 'vae_encode_over_bare', 'q8_over_q1'):
            assert m[key] > 0, (method, key)
        assert m['method_unet_seconds'] > 0 and m['full_unet']['seconds'] > 0
    # SD 1.x layout: cross-only reads up to block 9, T2M up to block 11 (its S^2 layer), of 16
    assert report['methods']['cross']['last_block_read'].startswith('9/16 ')
    assert report['methods']['t2m']['last_block_read'].startswith('11/16 ')
    print_report(report)
    assert 'unet/full' in capsys.readouterr().out
