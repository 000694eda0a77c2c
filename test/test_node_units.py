"""In-process checks of the node's parts: queries, mailbox, log filter, diagnostics, overlay, parameters."""
import threading

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus
import numpy as np
import pytest
import rclpy
from rclpy.parameter import Parameter
from rclpy.time import Time as RosTime

from diffseg_ros.core.segmenter import SegmenterConfig
from diffseg_ros.core.settings import items
from diffseg_ros.ros.diagnostics import build_diagnostics, NodeStats, RepeatFilter
from diffseg_ros.ros.mailbox import Mailbox
from diffseg_ros.core.overlay import draw_overlay, label_colour
from diffseg_ros.ros.params import changed_settings, declare_settings, descriptor, ParameterError
from diffseg_ros.ros.queries import MAX_PHRASE_CHARS, MAX_QUERIES, MAX_QUERY_BYTES, parse_query, QueryError
from diffseg_ros.ros.segmentation_node import diagnostic_status, NodeSettings, state_values


# --- queries --------------------------------------------------------------------------------------------
def test_query_split_strip_and_drop_empty():
    assert parse_query(' my mug ;red  bottle;; ;').phrases == ['my mug', 'red bottle']
    assert parse_query('').phrases == [] and parse_query(' \t ; ').phrases == []


def test_query_duplicates_ignore_case():
    assert parse_query('Mug; mug; MUG ; cup').phrases == ['Mug', 'cup']


def test_query_control_and_replacement_characters_removed_with_warning():
    parsed = parse_query('red\x1bmug\ufffd; \u200bcup')
    assert parsed.phrases == ['red mug', 'cup']
    assert parsed.warnings == ['removed control or invalid characters from the query text']
    assert parse_query('\x07;\ufffd').phrases == []


def test_query_count_limited_and_dropped_named():
    parsed = parse_query(';'.join(f'thing {i}' for i in range(MAX_QUERIES + 2)))
    assert len(parsed.phrases) == MAX_QUERIES
    assert parsed.dropped == [f'thing {MAX_QUERIES}', f'thing {MAX_QUERIES + 1}']
    assert f'thing {MAX_QUERIES + 1}' in parsed.warnings[-1]


def test_query_size_limit_counts_utf8_bytes():
    assert parse_query('a' * MAX_QUERY_BYTES).phrases == ['a' * MAX_PHRASE_CHARS]   # accepted, phrase cut
    with pytest.raises(QueryError, match=f'query message of {MAX_QUERY_BYTES + 2} bytes refused'):
        parse_query('\u00e9' * (MAX_QUERY_BYTES // 2 + 1))


# --- mailbox ----------------------------------------------------------------------------------------------
def test_mailbox_keeps_only_the_newest_item_per_key():
    box = Mailbox()
    assert box.put('frame', 1) is False
    assert box.put('frame', 2) is True
    assert box.put('queries', 'q') is False
    assert box.take(timeout=0) == {'frame': 2, 'queries': 'q'}
    assert box.take(timeout=0.01) == {}


def test_mailbox_wakes_the_consumer_and_close_releases_it():
    box, taken = Mailbox(), []
    worker = threading.Thread(target=lambda: taken.append(box.take(timeout=30)))
    worker.start()
    box.put('frame', 'x')
    worker.join(timeout=30)
    assert taken == [{'frame': 'x'}]
    worker = threading.Thread(target=lambda: taken.append(box.take(timeout=30)))
    worker.start()
    box.close()
    worker.join(timeout=30)
    assert taken[-1] == {} and box.closed


# --- log filter ---------------------------------------------------------------------------------------------
def test_repeat_filter_lets_each_line_through_once_per_period():
    now = [100.0]
    repeats = RepeatFilter(period=5.0, clock=lambda: now[0])
    assert repeats.allow('a') and not repeats.allow('a') and repeats.allow('b')
    now[0] += 5.0
    assert repeats.allow('a') == 'a (+1 more like it in the last 5 s)'


def test_repeat_filter_counts_a_kind_and_says_how_many_were_held_back():
    now = [100.0]
    repeats = RepeatFilter(period=5.0, clock=lambda: now[0])
    lines = [repeats.allow(f"bad image on /image: unsupported image encoding 'x{i}' ({i} bytes)")
             for i in range(1000)]
    assert lines[0] and not any(lines[1:])   # one kind: numbers and quoted values differ
    assert repeats.allow('query refused: too long')   # another kind is not held back
    now[0] += 6.0
    line = repeats.allow("bad image on /image: unsupported image encoding 'y' (7 bytes)")
    assert line == ("bad image on /image: unsupported image encoding 'y' (7 bytes) "
                    '(+999 more like it in the last 6 s)')


# --- diagnostics --------------------------------------------------------------------------------------
DESCRIBE = dict(model='/models/x', device='cpu', dtype='float32', method='t2m')
LEVEL = {int.from_bytes(getattr(DiagnosticStatus, name), 'little'): name for name in ('OK', 'WARN', 'ERROR')}


def report(stats, now_ns=5 * 10**9):
    copy = stats.report()
    status = build_diagnostics('diffseg: segmentation', '/diffseg', DESCRIBE, diagnostic_status(copy),
                               state_values(copy), {'queries rejected': copy['queries_rejected']}, copy,
                               RosTime(nanoseconds=now_ns), 'frames without query').status[0]
    return LEVEL[int.from_bytes(status.level, 'little')], {kv.key: kv.value for kv in status.values}, status


def test_diagnostics_warn_when_images_arrive_without_query():
    stats = NodeStats()
    assert report(stats)[0] == 'OK'
    stats.count('received')
    level, values, status = report(stats)
    assert level == 'WARN' and 'no query' in status.message and values['frames received'] == '1'
    assert status.name == 'diffseg: segmentation' and status.hardware_id == '/models/x'


def test_diagnostics_error_shows_in_the_next_report_then_clears():
    stats = NodeStats()
    stats.set_queries(['mug'])
    stats.count('received', 2)
    stats.frame_failed('rejected', 'bad image: nope')
    stats.frame_done(Time(sec=4, nanosec=500_000_000), 0.25)   # a good frame right after
    level, values, _ = report(stats)
    assert level == 'ERROR' and values['last error'] == 'bad image: nope' and values['frames rejected'] == '1'
    level, values, _ = report(stats)
    assert level == 'OK' and values['last error'] == 'bad image: nope'
    assert values['result age (s)'] == '0.500' and values['inference latency mean (s)'] == '0.250'


def test_diagnostics_warn_when_a_frame_waits_over_a_few_compute_periods():
    now = [0.0]
    stats = NodeStats(clock=lambda: now[0])
    stats.set_queries(['mug'])
    stats.count('received')
    stats.frame_pending()
    now[0] = 0.9
    assert report(stats)[0] == 'OK'                    # under the 1-s floor
    stats.frame_done(Time(sec=1), 0.5)
    now[0] = 60.0
    assert report(stats)[0] == 'OK'                    # no frame waits: the camera went quiet
    stats.frame_pending()
    now[0] = 61.4
    assert report(stats)[0] == 'OK'                    # 1.4 s <= 3 x 0.5 s mean latency
    stats.frame_pending()                              # a newer frame replaces it: the wait goes on
    now[0] = 61.6
    level, _, status = report(stats)
    assert level == 'WARN' and 'waited 1.6 s' in status.message
    stats.frame_done(Time(sec=2), 0.5)
    assert report(stats)[0] == 'OK'                    # caught up


def test_diagnostics_latency_is_the_mean_of_the_last_20():
    stats = NodeStats()
    for latency in [10.0] * 5 + [1.0] * 20:
        stats.frame_done(Time(), latency)
    assert report(stats)[1]['inference latency mean (s)'] == '1.000'


def test_diagnostics_values_count_every_kind_of_frame():
    stats = NodeStats()
    stats.set_queries(['red mug', 'my mug'])
    stats.count('received', 7)
    stats.count('dropped', 2)
    stats.count('waiting')
    stats.frame_failed('rejected', 'bad image: short data')
    stats.query_failed('query refused: too long')
    stats.frame_done(Time(sec=4), 0.5)
    values = report(stats)[1]
    assert values == {
        'node': '/diffseg', 'model': '/models/x', 'device': 'cpu', 'dtype': 'float32', 'method': 't2m',
        'queries': 'red mug; my mug', 'concepts': '', 'concepts refused': '0', 'learn': '',
        'inference latency mean (s)': '0.500', 'inference latency samples': '1', 'result age (s)': '1.000',
        'frames received': '7', 'frames processed': '1', 'frames dropped': '2', 'frames rejected': '1',
        'frames failed': '0', 'frames without query': '1', 'queries rejected': '1',
        'last error': 'query refused: too long'}


def test_diagnostics_show_concepts_and_the_latest_learn_request():
    stats = NodeStats()
    stats.set_concepts(['my mug', 'my bottle'], refused=1)
    stats.set_learn({'request': 'my cup = mug', 'state': 'training', 'progress': 0.456})
    values = report(stats)[1]
    assert values['concepts'] == 'my mug; my bottle' and values['concepts refused'] == '1'
    assert values['learn'] == "'my cup = mug': training 46%"


# --- overlay ------------------------------------------------------------------------------------------
def test_overlay_tints_labelled_pixels_and_keeps_background():
    rgb = np.full((60, 80, 3), 100, np.uint8)
    labels = np.zeros((60, 80), np.uint8)
    labels[5:25, 5:30], labels[35:55, 45:75] = 1, 2
    overlay = draw_overlay(rgb, labels, ['mug', 'bottle'], alpha=1.0)
    assert overlay.shape == rgb.shape and overlay.dtype == np.uint8
    np.testing.assert_array_equal(overlay[labels == 0][:10], rgb[labels == 0][:10])
    assert (overlay[6, 6] == label_colour(1)).all() and (overlay[36, 46] == label_colour(2)).all()
    changed = np.any(overlay[labels == 1] != label_colour(1), axis=-1)
    assert changed.any()   # the name was written over the region


def test_overlay_without_any_region_is_the_image():
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    np.testing.assert_array_equal(draw_overlay(rgb, np.zeros((10, 12), np.uint8), ['mug']), rgb)


# --- parameters ---------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def rclpy_context(ros_env):
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


def make_node(context, **overrides):
    overrides = [Parameter(name.replace('__', '.'), value=value) for name, value in overrides.items()]
    return rclpy.create_node('diffseg', context=context, parameter_overrides=overrides)


def test_defaults_follow_the_settings(rclpy_context):
    node = make_node(rclpy_context)
    try:
        settings = declare_settings(node, NodeSettings)
        assert settings == NodeSettings() and settings.engine.segmenter == SegmenterConfig()
        assert settings.engine.segmenter.background_words == ()   # empty = model default
        declared = set(node.list_parameters([], 0).names) - {'use_sim_time', 'start_type_description_service'}
        assert declared == {item.name for item in items(NodeSettings) if item.rule.exposed}
        assert 'instances.kv_mode' not in declared and 'learn.frames' in declared
    finally:
        node.destroy_node()


def test_descriptors_carry_ranges_and_read_only():
    by_name = {item.name: item for item in items(NodeSettings)}
    depth = descriptor(by_name['qos.image.depth'])
    bounds = (depth.integer_range[0].from_value, depth.integer_range[0].to_value)
    assert depth.read_only and bounds == (1, 100)
    alpha = descriptor(by_name['overlay_alpha'])
    assert not alpha.read_only and alpha.floating_point_range[0].to_value == 1.0
    size = descriptor(by_name['image_size'])       # '0 or 64..2048': the range spans the extra value
    assert (size.integer_range[0].from_value, size.additional_constraints) == (0, '0 or 64..2048')


def test_overrides_are_typed_and_mapped(rclpy_context):
    node = make_node(rclpy_context, cross_layers=[4, 5], background_words=['floor'], method='cross',
                     qos__image__reliability='reliable', learn__frames=3)
    try:
        settings = declare_settings(node, NodeSettings)
        config = settings.engine.segmenter
        assert config.cross_layers == (4, 5) and config.background_words == ('floor',)
        assert config.method == 'cross' and settings.qos.reliability == 'reliable'
        assert settings.engine.learn.frames == 3
    finally:
        node.destroy_node()


@pytest.mark.parametrize('overrides, message', [
    (dict(noise_samples='3'),
     "noise_samples: Trying to set parameter 'noise_samples' to '3' of type 'STRING'"),
    (dict(overlay_alpha=2.0), 'overlay_alpha must be in [0, 1], got 2.0'),
    (dict(qos__image__depth=0), 'qos.image.depth must be 1..100, got 0'),
    (dict(image_size=10), 'image_size must be 0 or 64..2048, got 10'),
    (dict(dtype='float8'), 'dtype must be one of'),
    (dict(device='tpu'), "device must be 'cpu' or 'cuda[:N]'"),
])
def test_bad_values_raise_parameter_error(rclpy_context, overrides, message):
    node = make_node(rclpy_context, **overrides)
    try:
        with pytest.raises(ParameterError) as raised:
            declare_settings(node, NodeSettings)
        assert message in str(raised.value)
    finally:
        node.destroy_node()


def test_runtime_update_validates_like_start():
    settings = NodeSettings()
    changes = [Parameter('box_threshold', value=0.3), Parameter('overlay_alpha', value=0.1),
               Parameter('use_sim_time', value=False)]
    updated = changed_settings(settings, changes)
    assert updated.engine.segmenter.box_threshold == 0.3 and updated.output.overlay_alpha == 0.1
    assert settings.engine.segmenter.box_threshold != 0.3 and updated.engine.learn == settings.engine.learn
    with pytest.raises(ParameterError, match='tau must be in'):
        changed_settings(settings, [Parameter('tau', value=0.0)])


# --- query subscriptions ------------------------------------------------------------------------------------
def test_a_query_sample_delivered_by_both_subscriptions_is_taken_once():
    from diffseg_ros.ros.queries import SampleFilter
    samples = SampleFilter()
    info = {'publisher_gid': {'data': b'\x01' * 16}, 'publication_sequence_number': 3, 'source_timestamp': 5}
    assert samples.first_time(info) and not samples.first_time(dict(info))
    assert samples.first_time(dict(info, publication_sequence_number=4))
