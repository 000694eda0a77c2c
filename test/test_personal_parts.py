"""In-process checks of the node's personal-concept parts: assignments, depth, markers, learn jobs, engine."""
from dataclasses import replace
import json
import os
from pathlib import Path
from types import SimpleNamespace

from builtin_interfaces.msg import Time
import jsonschema
import numpy as np
import pytest
from std_msgs.msg import Header
import torch
from visualization_msgs.msg import Marker

from diffseg_ros.core.assignments import (build_assignments, centre_point, instance_labels,
                                          semantic_instances)
from diffseg_ros.core.concepts import Concept, ConceptError, KV_FILE, save_concept
from diffseg_ros.core.geometry import intrinsics
from diffseg_ros.core.instances import QueryResult
from diffseg_ros.core.concept_learning import LearnSettings
from diffseg_ros.core.learn_job import (crop_segment, is_cancel_request, LearnCancelled, LearnConfig,
                                        LearnJob, LearnRequestError, parse_learn_request, train_job)
from diffseg_ros.core.query_engine import EngineConfig, QueryEngine
from diffseg_ros.core.segmenter import INSTANCE_TIMESTEP, Segmenter, SegmenterConfig
from diffseg_ros.ros.depth import DepthCache
from diffseg_ros.ros.image_codec import numpy_to_image_msg
from diffseg_ros.ros.markers import marker_array, MarkerTracker

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / 'config' / 'assignments.schema.json').read_text())
FAST = LearnSettings(steps=3, batch=2, size=32, class_count=2, sample_steps=2, seed=0)


def valid(assignments):
    jsonschema.validate(assignments, SCHEMA)
    return assignments


# --- assignments --------------------------------------------------------------------------------------------
def two_objects(height=20, width=30):
    instances = np.zeros((height, width), np.uint16)
    instances[2:8, 3:9] = 4
    instances[10:18, 15:27] = 7
    return instances


def test_assignments_box_pixels_and_centroid_follow_the_instance_image():
    instances = two_objects()
    depth = np.full(instances.shape, 2.0, np.float32)
    depth[10:18, 15:27] = 1.0
    depth[10, 15] = 5.0                                          # one mask pixel on the background
    depth[11, 16] = np.nan                                       # and one without depth
    K = intrinsics(30, 20, 60.0)
    mine = QueryResult('my mug', '<new1> mug', 'my mug', 'mug', instance_id=7, score=0.8, alone_instance_id=4)
    other = QueryResult('blue bottle', 'blue bottle', '', '', instance_id=0)
    data = valid(build_assignments((1000, 5), 'cam', 'instances', [mine, other], instances, depth, K,
                                   depth_frame='cam'))
    first, second = data['queries']
    assert data['header'] == {'stamp': {'sec': 1000, 'nanosec': 5}, 'frame_id': 'cam'}
    assert (data['width'], data['height'], data['depth']) == (30, 20, {'used': True, 'frame_id': 'cam',
                                                                       'note': ''})
    assert first['bbox'] == {'x': 15, 'y': 10, 'width': 12, 'height': 8} and first['pixels'] == 96
    assert (first['concept'], first['class_word'], first['alone_instance_id']) == ('my mug', 'mug', 4)
    centre = first['centroid']
    assert centre['z'] == 1.0 and centre['points'] == 95        # the median ignores the far pixel
    u = K[0, 0] * centre['x'] / centre['z'] + K[0, 2]
    assert 15 <= u <= 26
    assert second == dict(second, instance_id=0, bbox=None, pixels=0, centroid=None, concept=None)


def test_assignments_without_depth_say_why():
    data = valid(build_assignments((1, 2), 'cam', 'semantic', [QueryResult('mug', 'mug', '', '', 4, 0.5)],
                                   two_objects(), depth_note='no depth image received'))
    assert data['depth'] == {'used': False, 'frame_id': '', 'note': 'no depth image received'}
    assert data['queries'][0]['centroid'] is None and data['queries'][0]['pixels'] == 36


def test_centre_point_none_without_valid_depth():
    points = np.full((4, 4, 3), np.nan)
    assert centre_point(points, np.ones((4, 4), bool)) is None


def test_semantic_masks_become_instances_and_back():
    labels = np.zeros((6, 6), np.uint8)
    labels[:3], labels[3:, :2] = 1, 2
    result = SimpleNamespace(queries=['mug', 'bottle', 'cup'], labels=labels, scores=[0.7, 0.4, 0.9])
    instances, queries = semantic_instances(result)
    assert instances.dtype == np.uint16 and np.array_equal(instances, labels)
    assert [q.instance_id for q in queries] == [1, 2, 0]
    assert queries[0].score == pytest.approx(0.7) and queries[2].score == 0.0
    np.testing.assert_array_equal(instance_labels(instances, queries), labels)


def test_instance_labels_first_query_wins_a_shared_instance():
    instances = two_objects()
    queries = [QueryResult(name, name, '', '', instance) for name, instance in (('a', 7), ('b', 7), ('c', 4))]
    labels = instance_labels(instances, queries)
    assert set(np.unique(labels[instances == 7])) == {1} and set(np.unique(labels[instances == 4])) == {3}


# --- depth --------------------------------------------------------------------------------------------------
def stamped(sec, nanosec=0, frame='cam'):
    return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id=frame)


def camera_info(width, height, focal=30.0):
    from sensor_msgs.msg import CameraInfo
    K = [focal, 0.0, width / 2, 0.0, focal, height / 2, 0.0, 0.0, 1.0]
    return CameraInfo(width=width, height=height, k=K)


def test_depth_cache_decodes_millimetres_and_refuses_other_encodings():
    cache = DepthCache()
    cache.set_info(camera_info(2, 1))
    cache.add_depth(numpy_to_image_msg(np.array([[0, 1500]], np.uint16), '16UC1', stamped(3)))
    depth = cache.lookup(stamped(3), 0.05, (1, 2))[0]
    assert np.isnan(depth[0, 0]) and depth[0, 1] == pytest.approx(1.5)
    cache.add_depth(numpy_to_image_msg(np.zeros((1, 2), np.uint8), 'mono8', stamped(4)))
    assert 'depth encoding' in cache.lookup(stamped(4), 0.05, (1, 2))[3]


def test_depth_cache_picks_the_nearest_frame_within_tolerance():
    cache = DepthCache()
    assert cache.lookup(stamped(10), 0.05, (4, 6))[3] == 'no depth image received'
    for sec, value in ((9, 1.0), (10, 2.0)):
        cache.add_depth(numpy_to_image_msg(np.full((4, 6), value, np.float32), '32FC1', stamped(sec)))
    assert cache.lookup(stamped(10), 0.05, (4, 6))[3] == 'no camera_info received'
    cache.set_info(camera_info(6, 4))
    depth, K, frame, note = cache.lookup(stamped(10, 20_000_000), 0.05, (4, 6))
    assert note == '' and frame == 'cam' and depth[0, 0] == 2.0 and K[0, 0] == 30.0
    assert 'from the image' in cache.lookup(stamped(11), 0.05, (4, 6))[3]
    assert 'not aligned' in cache.lookup(stamped(10), 0.05, (8, 12))[3]
    cache.set_info(camera_info(6, 4, focal=0.0))
    assert 'uncalibrated' in cache.lookup(stamped(10), 0.05, (4, 6))[3]


def test_depth_matched_on_arrival_outlives_the_buffer():
    cache = DepthCache(size=2)
    cache.set_info(camera_info(6, 4))
    cache.add_depth(numpy_to_image_msg(np.full((4, 6), 2.0, np.float32), '32FC1', stamped(10)))
    matched = cache.match(stamped(10), 0.05)                    # the image of stamp 10 arrives
    assert matched is not None and cache.match(stamped(12), 0.05) is None
    for sec in (11, 12, 13):                                    # the model was slow: newer depth came
        cache.add_depth(numpy_to_image_msg(np.full((4, 6), 9.0, np.float32), '32FC1', stamped(sec)))
    assert 'from the image' in cache.lookup(stamped(10), 0.05, (4, 6))[3]
    depth, _, _, note = cache.lookup(stamped(10), 0.05, (4, 6), matched)
    assert note == '' and depth[0, 0] == 2.0


# --- markers ------------------------------------------------------------------------------------------------
def assignments_with(centroid, instance_id=3, frame=''):
    return {'depth': {'frame_id': frame}, 'queries': [
        {'label': 1, 'phrase': 'my mug', 'instance_id': instance_id, 'score': 0.5, 'centroid': centroid},
        {'label': 2, 'phrase': 'cup', 'instance_id': 0, 'score': 0.0, 'centroid': None}]}


def test_markers_label_and_sphere_at_the_centroid_after_a_deleteall():
    data = assignments_with({'x': 0.1, 'y': 0.2, 'z': 1.5, 'points': 9}, frame='depth_frame')
    msg = marker_array(data, stamped(7), 1.5, clear=True)
    types = [(m.action, m.type) for m in msg.markers]
    assert types == [(Marker.DELETEALL, 0), (Marker.ADD, Marker.TEXT_VIEW_FACING),
                     (Marker.ADD, Marker.SPHERE)]
    label, sphere = msg.markers[1:]
    assert all(m.header.frame_id == 'depth_frame' and m.header.stamp.sec == 7 for m in msg.markers)
    assert (sphere.pose.position.x, sphere.pose.position.y, sphere.pose.position.z) == (0.1, 0.2, 1.5)
    assert label.text.startswith('my mug') and label.pose.position.y < sphere.pose.position.y
    assert (sphere.lifetime.sec, sphere.lifetime.nanosec) == (1, 500_000_000)
    assert len(marker_array(data, stamped(7), 1.5, clear=False).markers) == 2
    assert len(marker_array(assignments_with(None), stamped(7), 1.0, clear=False).markers) == 0


def test_marker_tracker_clears_on_change_and_lives_twice_the_period():
    tracker = MarkerTracker()
    placed = assignments_with({'x': 0.0, 'y': 0.0, 'z': 1.0, 'points': 1})
    assert tracker.update(placed, 10.0, latency=0.4) == (True, pytest.approx(0.8))
    assert tracker.update(placed, 11.0, latency=0.4) == (False, pytest.approx(2.0))
    assert tracker.update(assignments_with(None), 13.0, latency=0.4) == (True, pytest.approx(3.0))
    tracker.lifetime = 5.0
    assert tracker.update(assignments_with(None), 14.0, latency=0.4) == (False, 5.0)


# --- learn requests and jobs --------------------------------------------------------------------------------
def test_learn_request_parsing():
    request = parse_learn_request('  My Mug =\tmug ')
    assert (request.name, request.class_word, request.text) == ('My Mug', 'mug', 'My Mug = mug')
    request = parse_learn_request('my mug, mug of mine ,my cup = mug')
    assert (request.name, request.aliases, request.class_word) == ('my mug', ('mug of mine', 'my cup'), 'mug')
    for text, message in (('my mug', 'must be'), ('= mug', 'must be'), ('a = b = c', 'must be'),
                          ('mug = mug', 'must differ'), ('../x = mug', 'path separator'),
                          ('my mug = <new1>', 'may not hold'), ('x' * 300 + ' = mug', 'longer'),
                          ('my mug, = mug', 'must be'), ('my mug, Mug = mug', 'must differ'),
                          ('my mug, a;b = mug', 'may not hold')):
        with pytest.raises(LearnRequestError, match=message):
            parse_learn_request(text)


def test_crop_segment_takes_the_largest_piece_with_margin():
    rgb = np.arange(40 * 50 * 3, dtype=np.uint32).reshape(40, 50, 3).astype(np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[10:20, 20:30] = True           # 100 px
    mask[0:2, 0:2] = True               # a speck
    crop = crop_segment(rgb, mask, margin=0.2)
    assert crop.shape == (14, 14, 3)
    np.testing.assert_array_equal(crop, rgb[8:22, 18:32])
    assert crop_segment(rgb, np.zeros((40, 50), bool)) is None
    assert crop_segment(rgb, mask & (np.arange(50) < 5)[None, :]) is None      # only the speck: too small


def test_learn_job_collects_then_trains():
    job = LearnJob(1, parse_learn_request('my mug = mug'), frames=3)
    assert job.status()['state'] == 'queued' and job.active
    job.start_collecting(now=0.0)
    rgb = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    progress = []
    for m in (mask, np.zeros_like(mask), mask):
        assert job.state == 'collecting'
        job.add_frame(rgb, m)
        progress.append(job.progress)
    status = job.status()
    assert status['state'] == 'training' and (status['frames'], status['crops']) == (3, 2)
    assert progress == sorted(progress) and 0 < progress[-1] < 1
    job.training_step(5, 10, 0.1)
    assert progress[-1] < job.progress < 1
    job.finish('ok')
    assert job.status()['state'] == 'done' and job.progress == 1.0 and not job.active


def test_learn_job_without_any_segment_fails_and_times_out():
    job = LearnJob(2, parse_learn_request('my mug = mug'), frames=2)
    job.start_collecting(now=0.0)
    assert not job.expired(10.0, now=5.0) and job.expired(10.0, now=11.0)
    for _ in range(2):
        job.add_frame(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool))
    assert job.state == 'failed' and "no segment of 'mug'" in job.message
    assert not job.expired(10.0, now=100.0)
    refused = LearnJob.refused(3, 'junk\x07', 'bad request')
    assert refused.status() == dict(refused.status(), state='failed', name=None, request='junk')


def test_failed_training_saves_nothing(tmp_path):
    job = LearnJob(1, parse_learn_request('my mug = mug'), frames=1)
    job.crops = [np.zeros((8, 8, 3), np.uint8)]

    class Broken:
        def learn(self, *args, progress=None, **kwargs):
            progress(1, 3, 0.5)
            raise RuntimeError('out of memory')
    with pytest.raises(RuntimeError):
        train_job(job, Broken(), str(tmp_path), '<new1>', FAST)
    assert os.listdir(tmp_path) == [] and job.concept is None


def test_cancel_ends_an_active_job_for_good_and_training_saves_nothing(tmp_path):
    assert is_cancel_request(' Cancel ') and not is_cancel_request('cancel = mug')
    job = LearnJob(1, parse_learn_request('my mug = mug'), frames=2)
    job.start_collecting(now=0.0)
    assert job.cancel() and not job.active and not job.cancel()
    job.add_frame(np.zeros((20, 20, 3), np.uint8), np.ones((20, 20), bool))    # a frame already in the worker
    assert (job.state, job.message) == ('failed', 'cancelled by request')

    class Trainer:      # the planner cancels while the last step runs
        def learn(self, *args, progress=None, **kwargs):
            progress(1, 1, 0.5)
            job.cancel()
            return object()
    job = LearnJob(2, parse_learn_request('my mug = mug'), frames=1)
    job.start_collecting(now=0.0)
    job.add_frame(np.zeros((20, 20, 3), np.uint8), np.ones((20, 20), bool))
    with pytest.raises(LearnCancelled):
        train_job(job, Trainer(), str(tmp_path), '<new1>', FAST, cancelled=lambda: job.cancelled)
    assert os.listdir(tmp_path) == [] and job.state == 'failed'


# --- the engine on the tiny model ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def engine(tiny_model_dir, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp('concepts')
    statuses = []
    engine = QueryEngine(EngineConfig(SegmenterConfig(model_path=tiny_model_dir, image_size=64),
                                      concepts_dir=str(folder), learn=LearnConfig(frames=1, training=FAST)),
                         on_learn=lambda job: statuses.append(job.status()))
    engine.statuses = statuses
    yield engine
    engine.library.uninstall()
    torch.set_num_threads(threads)


def perturbed(library, name, fingerprint=None, aliases=(), seed=1):
    """Make a concept whose K/V differ clearly from the base model's."""
    g = torch.Generator().manual_seed(seed)
    kv = {n: tuple(w + 0.5 * w.std() * torch.randn(w.shape, generator=g) for w in pair)
          for n, pair in library.base_kv.items()}
    dim = library.base_embedding.weight.shape[1]
    return Concept(name, 'mug', '<new1>', torch.randn(dim, generator=g) * 0.02, kv,
                   fingerprint or library.fingerprint, list(aliases))


def test_engine_plain_queries_stay_semantic(engine):
    state = engine.set_queries(['red mug', 'blue bottle'])
    assert state.mode == 'semantic' and [q.prompt for q in state.queries] == ['red mug', 'blue bottle']
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    result = engine.segment(rgb)
    assert result.mode == 'semantic' and result.instances.dtype == np.uint16
    np.testing.assert_array_equal(result.instances, result.labels)


def test_engine_reload_resolves_names_and_reports_refusals(engine):
    folder = engine.config.concepts_dir
    save_concept(perturbed(engine.library, 'my mug', aliases=['mug of mine']), folder)
    save_concept(perturbed(engine.library, 'odd mug', fingerprint='0123456789abcdef', seed=2), folder)
    engine.set_queries(['my mug', 'blue bottle'])
    report = engine.reload()
    assert [c.name for c in report.loaded] == ['my mug'] and not report.ok
    assert list(report.refused) == [os.path.join(folder, 'odd-mug')]
    assert 'trained on base model 0123456789abcdef' in report.summary()
    state = engine.state                                   # the active phrases were resolved again
    assert state.mode == 'instances'
    assert [(q.text, q.prompt, q.concept) for q in state.queries] == [
        ('my mug', '<new1> mug', 'my mug'), ('blue bottle', 'blue bottle', '')]
    rgb = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    result = engine.segment(rgb)
    assert result.mode == 'instances' and result.instances.shape == (48, 64)
    assert [q.concept for q in result.queries] == ['my mug', '']
    for label, query in enumerate(result.queries, start=1):
        if query.instance_id:
            assert (result.labels == label).any()
    assert engine.concepts() == [{'name': 'my mug', 'aliases': ['mug of mine'], 'class_word': 'mug',
                                  'token': '<new1>', 'appearance': False}]   # learned without prototypes


def test_engine_aliases_of_one_concept_are_one_query(engine):
    engine.set_queries(['my mug'])
    engine.reload()
    state = engine.set_queries(['my mug', 'Mug of mine'])
    assert [q.text for q in state.queries] == ['my mug'] and 'means the same' in state.warnings[0]


def test_engine_refuses_a_new_concept_named_like_another(engine):
    engine.reload()
    with pytest.raises(ConceptError, match="already names the concept 'my mug'"):
        engine.check_new_concept('Mug of Mine')
    engine.check_new_concept('my mug')          # learning it again replaces it
    engine.check_new_concept('your mug')
    with pytest.raises(ConceptError, match="'mug of mine' already names the concept 'my mug'"):
        engine.check_new_concept('your mug', aliases=('mug of mine',))


def test_engine_learns_from_crops_and_loads_the_result(engine):
    rgb = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mask = engine.class_mask(rgb, 'mug')
    assert mask.shape == (48, 64) and mask.dtype == bool
    job = LearnJob(1, parse_learn_request('your mug, mug of yours = mug'), frames=1)
    job.start_collecting()
    full = np.ones((48, 64), bool)
    job.add_frame(rgb, full)
    assert job.state == 'training'
    reports = []
    concept = train_job(job, engine.trainer(), engine.config.concepts_dir, '<new2>', FAST,
                        report=lambda: reports.append(job.progress), report_every=1)
    assert len(reports) == FAST.steps and job.concept is concept
    assert sorted(os.listdir(os.path.join(engine.config.concepts_dir, 'your-mug'))) == sorted(
        ['<new2>.safetensors', KV_FILE, 'concept.json'])
    engine.set_queries(['your mug', 'my mug'])
    report = engine.reload()
    assert {c.name for c in report.loaded} == {'my mug', 'your mug'}
    assert [q.concept for q in engine.state.queries] == ['your mug', 'my mug']
    assert engine.library.find('mug of yours').name == 'your mug'       # the alias of the request


def test_engine_learn_flow_from_request_to_installed_concept(engine, monkeypatch):
    engine.statuses.clear()
    monkeypatch.setattr(engine, 'class_mask', lambda rgb, word: np.ones(rgb.shape[:2], bool))
    job = engine.learn('his mug = mug')
    assert job.state == 'queued' and engine.learn('cancel me = mug').message.startswith('busy: still')
    engine.poll()                                           # the worker starts it between frames
    assert job.state == 'collecting' and engine.wants_frames
    engine.process(np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    assert job.state == 'training'
    engine.learning.thread.join(timeout=300)
    assert engine.learning.thread is not None and not engine.learning.thread.is_alive()
    report = engine.poll()                                  # installs the saved concept
    assert job.state == 'done' and report is not None and engine.library.find('his mug') is not None
    assert engine.poll() is None                            # installed once
    states = [status['state'] for status in engine.statuses if status['request'] == 'his mug = mug']
    assert states[0] == 'queued' and states[-1] == 'done' and {'collecting', 'training'} <= set(states)
    assert job.status()['progress'] == 1.0 and 'his mug' in job.message


def test_instance_path_runs_t2m_on_frames_at_their_own_size_from_the_training_size(tiny_model_dir):
    config = SegmenterConfig(model_path=tiny_model_dir, method='cross', timestep=3, cross_layers=(1,))
    sd = QueryEngine(EngineConfig(config)).segmenter.sd
    native = sd.native_image_size
    assert Segmenter(config, components=sd).settings.image_size == native    # no defaults file: its own size
    config = replace(config, image_size=512)
    engine = QueryEngine(EngineConfig(config))
    seg = engine.personal.seg
    instance, papers = seg.settings, Segmenter(replace(config, method='t2m', timestep=-1, cross_layers=()),
                                               components=sd).settings
    expected = ('t2m', INSTANCE_TIMESTEP, papers.cross_layers)
    assert (instance.method, instance.timestep, instance.cross_layers) == expected
    assert instance.background_words == () and instance.stuff_words == papers.background_words
    assert (instance.image_size, instance.min_image_size) == (512, native)
    assert seg.input_size(native // 2) == native and seg.input_size(300) == 300 and seg.input_size(900) == 512
    assert engine.segmenter.input_size(300) == 512         # the semantic path always resizes
    explicit = Segmenter(replace(config, image_size=96, min_image_size=96), components=sd, instances=True)
    assert explicit.input_size(300) == explicit.input_size(40) == 96                  # explicit sizes win
    rgb = np.zeros((30, 40, 3), np.uint8)
    pixels, where = seg.images.preprocess(rgb, seg.input_size(max(rgb.shape[:2])))
    assert where.valid == (native * 3 // 4, native)          # upscaled to the training size


def test_reload_without_a_folder(tiny_model_dir, tmp_path):
    config = SegmenterConfig(model_path=tiny_model_dir, image_size=64, method='cross')
    engine = QueryEngine(EngineConfig(config, concepts_dir=str(tmp_path / 'later')))
    try:
        report = engine.reload()
        assert report.loaded == [] and 'does not exist yet' in report.summary() and not report.ok
        assert engine.personal.seg.settings.method == 't2m'
    finally:
        engine.library.uninstall()


# --- parameters ----------------------------------------------------------------------------------------
def test_personal_and_learn_parameters_map_and_validate(ros_env):
    import rclpy
    from rclpy.parameter import Parameter

    from diffseg_ros.ros.params import declare_settings, ParameterError
    from diffseg_ros.ros.segmentation_node import NodeSettings
    context = rclpy.Context()
    rclpy.init(context=context)

    def declared(**overrides):
        params = [Parameter(name.replace('__', '.'), value=value) for name, value in overrides.items()]
        node = rclpy.create_node('diffseg', context=context, parameter_overrides=params)
        try:
            return declare_settings(node, NodeSettings).engine
        finally:
            node.destroy_node()
    try:
        engine = declared(learn__steps=7, learn__size=32, concepts_dir='/c')
        assert engine.concepts_dir == '/c' and engine.learn.training == LearnSettings(steps=7, size=32)
        for overrides, message in ((dict(learn__frames=0), 'learn.frames must be 1..100, got 0'),
                                   (dict(learn__size=4), 'learn.size must be 0 or 8..2048'),
                                   (dict(learn__margin=3.0), r'learn.margin must be in \[0, 2\]')):
            with pytest.raises(ParameterError, match=message):
                declared(**overrides)
    finally:
        rclpy.try_shutdown(context=context)
