"""Checks on every value a publisher controls: stamps, intrinsics, depth, string lengths, concept names."""
import json
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest

from diffseg_ros.core.assignments import build_assignments
from diffseg_ros.core.frame_outputs import depth_for_image
from diffseg_ros.core.frames import check_stamp, read_camera_info
from diffseg_ros.core.geometry import intrinsics
from diffseg_ros.core.image_encoding import image_fields, to_depth_metres
from diffseg_ros.core.instances import QueryResult
from diffseg_ros.core.learn_job import LearnFlow, LearnConfig, parse_learn_request, LearnRequestError
from diffseg_ros.core.query_engine import EngineConfig, QueryEngine
from diffseg_ros.core.segmenter import SegmenterConfig
from diffseg_ros.ros.queries import MAX_PHRASE_CHARS, parse_query

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / 'config' / 'assignments.schema.json').read_text())
WIDTH, HEIGHT = 30, 20


def instances():
    image = np.zeros((HEIGHT, WIDTH), np.uint16)
    image[10:18, 15:27] = 7
    return image


def assign(depth=None, K=None, note='', stamp=(1000, 5)):
    query = QueryResult('mug', 'mug', '', '', instance_id=7, score=0.5, alone_instance_id=7)
    data = build_assignments(stamp, 'cam', 'semantic', [query], instances(), depth, K, note, 'cam')
    jsonschema.validate(data, SCHEMA)
    return data


def msg(array, encoding, frame_id='cam'):
    return SimpleNamespace(header=SimpleNamespace(frame_id=frame_id), **image_fields(array, encoding))


def info(K, width=WIDTH, height=HEIGHT):
    return SimpleNamespace(k=np.asarray(K, float).reshape(-1), width=width, height=height)


@pytest.mark.parametrize('sec, nanosec', [(1, 4294967295), (1, 1_000_000_000), (-1, 0)])
def test_stamps_out_of_range_are_refused(sec, nanosec):
    with pytest.raises(ValueError, match='invalid stamp'):
        check_stamp(sec, nanosec)
    with pytest.raises(ValueError, match='invalid stamp'):
        assign(stamp=(sec, nanosec))
    assert assign(stamp=(2**31 - 1, 999_999_999))['header']['stamp']['nanosec'] == 999_999_999


@pytest.mark.parametrize('fx', [np.inf, np.nan, 1e-30, 0.0, -500.0, 1e30])
def test_unusable_focal_lengths_are_refused_with_the_reason_in_the_notes(fx):
    K = intrinsics(WIDTH, HEIGHT, 60.0)
    K[0, 0] = fx
    with pytest.raises(ValueError, match='unusable intrinsics'):
        read_camera_info(info(K))
    depth = np.full((HEIGHT, WIDTH), 2.0, np.float32)
    _, _, _, note = depth_for_image(msg(depth, '32FC1'), info(K), (HEIGHT, WIDTH))
    assert 'unusable intrinsics' in note
    data = assign(depth, K)   # also when the core API is handed K directly
    assert data['depth']['used'] is False and 'unusable intrinsics' in data['depth']['note']
    entry = data['queries'][0]
    assert entry['centroid'] is None and 'unusable intrinsics' in entry['note']


def test_depth_beyond_max_depth_or_not_finite_is_invalid_and_the_note_says_so():
    depth = np.full((HEIGHT, WIDTH), 3e38, np.float32)
    depth[0, 0], depth[0, 1], depth[0, 2], depth[0, 3] = 2.0, np.inf, -1.0, 150.0
    metres = to_depth_metres(msg(depth, '32FC1'), max_depth=100.0)
    assert metres[0, 0] == 2.0 and np.isnan(metres.ravel()[1:]).all()
    K = intrinsics(WIDTH, HEIGHT, 60.0)
    data = assign(metres, K)
    entry = data['queries'][0]
    assert data['depth']['used'] is True and entry['centroid'] is None
    assert entry['note'] == 'no valid depth (finite, positive, within max_depth) in the 96 instance pixels'
    good = assign(np.full((HEIGHT, WIDTH), 2.0, np.float32), K)['queries'][0]
    assert good['centroid']['z'] == 2.0 and 'note' not in good


def test_missing_centroids_say_why():
    K = intrinsics(WIDTH, HEIGHT, 60.0)
    assert assign(note='no depth image received')['queries'][0]['note'] == 'no depth image received'
    nan_depth = np.full((HEIGHT, WIDTH), np.nan, np.float32)
    assert assign(nan_depth, K)['queries'][0]['note'].startswith('no valid depth')
    query = QueryResult('cup', 'cup', '', '', instance_id=0)
    data = build_assignments((1, 2), 'cam', 'semantic', [query], instances(), nan_depth, K)
    assert data['queries'][0]['note'] == 'no instance assigned'


def test_a_huge_learn_request_is_refused_and_quoted_short():
    statuses = []
    flow = LearnFlow(LearnConfig(), 'concepts', lambda job: statuses.append(job.status()))
    flow.request('my mug = mug; ' * 80_000)   # about 1 MB
    status = statuses[-1]
    assert status['state'] == 'failed' and 'refused' in status['message']
    assert len(status['request']) < 120 and len(status['message']) < 120 and len(json.dumps(status)) < 400
    with pytest.raises(LearnRequestError, match='learn request of 1120000 characters refused'):
        parse_learn_request('my mug = mug; ' * 80_000)


def test_long_query_phrases_are_cut_and_warnings_stay_short():
    parsed = parse_query('x' * 5000 + '; ' + '; '.join(f'thing {i}' for i in range(200)))
    assert len(parsed.phrases[0]) == MAX_PHRASE_CHARS
    assert all(len(warning) < 200 for warning in parsed.warnings)


def test_a_personal_looking_phrase_without_its_concept_is_a_warning(tiny_model_dir):
    engine = QueryEngine(EngineConfig(SegmenterConfig(model_path=tiny_model_dir, image_size=64)))
    state = engine.set_queries(['my mug', 'red bottle'])
    assert state.mode == 'semantic'
    assert state.warnings == ["'my mug' names no loaded concept (loaded: none); read as plain text"]
    assert engine.set_queries(['red mug']).warnings == []
