"""train.py --tensorboard=True: scalars and expert-load histograms in out_dir/tb, expert_load.png."""
import pytest

from test_train import MICRO, records, train, work  # noqa: F401 (work is a fixture)


@pytest.mark.parametrize('grad_clip', [1.0, 0.0])
def test_tensorboard_scalars_and_expert_load(work, grad_clip):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = f'tb{grad_clip}'
    train(work, f'--out_dir={out}', '--tensorboard=True', '--max_iters=6', '--eval_interval=3',
          '--log_interval=2', f'--grad_clip={grad_clip}')
    events = EventAccumulator(str(work / out / 'tb'), size_guidance={'scalars': 0, 'histograms': 0})
    events.Reload()
    logged = records(work / out, 'train')
    assert [r['iter'] for r in logged] == [0, 2, 4]
    for name in ('loss', 'ce', 'balance', 'z', 'mtp', 'lr', 'tokens_per_sec', 'grad_norm', 'load_imbalance'):
        scalars = events.Scalars(f'train/{name}')
        assert [s.step for s in scalars] == [0, 2, 4], name
        assert [s.value for s in scalars] == pytest.approx([r[name] for r in logged], rel=1e-6), name
    assert all(r['grad_norm'] > 0 for r in logged)
    assert [s.step for s in events.Scalars('eval/val')] == [0, 3, 6]
    # MICRO has one MoE layer of 4 experts; a histogram per eval after the first logged step
    load = events.Histograms('expert_load/layer0')
    assert [h.step for h in load] == [3, 6]
    assert load[-1].histogram_value.bucket == pytest.approx(logged[-1]['load'][0], abs=1e-4)
    assert sum(logged[-1]['load'][0]) == pytest.approx(1.0, abs=1e-3) and len(logged[-1]['load'][0]) == 4
    for png in ('loss.png', 'expert_load.png'):
        assert (work / out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
