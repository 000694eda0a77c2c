"""Personal concepts in the diffseg node over real DDS, as separate processes, on the seeded tiny model.

"my mug" answered with instances, schema-valid assignments (3D centroids from depth) and markers; refused
concept files (corrupt, pickled, foreign base model) while the node serves; ~/reload_concepts; ~/learn
fed by the SynthWorld camera up to a usable concept; bad learn requests reported as failed.
"""
import json
import os
from pathlib import Path
import shutil

import jsonschema
import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger
import torch
from visualization_msgs.msg import Marker, MarkerArray

from diffseg_ros.core.concepts import Concept, KV_FILE, kv_state_dict, save_concept, text_attention_modules
from diffseg_ros.core.sd_models import load_sd_components
from diffseg_ros.ros.image_codec import image_msg_to_numpy, numpy_to_image_msg
from ros_harness import BEST_EFFORT, make_header, make_image, NodeProcess, RELIABLE, TIMEOUT, wait_until

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / 'config' / 'assignments.schema.json').read_text())
# Every status of a learn job, also those published in quick succession, for late joiners too.
STATUS_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)
WIDTH, HEIGHT, DEPTH_M = 64, 48, 1.5
REFUSED = {'corrupt-mug': 'not a valid safetensors file', 'disguised-mug': 'pickle',
           'foreign-mug': 'trained on base model 0123456789abcdef', 'pickled-mug': 'pickle files'}
FAST_LEARN = ('learn.batch:=2', 'learn.size:=32', 'learn.class_count:=2', 'learn.sample_steps:=2')


@pytest.fixture(scope='module')
def base(tiny_model_dir):
    """Fingerprint and cross-attention K/V of the tiny model, as the node will load it."""
    sd = load_sd_components(tiny_model_dir)
    kv = {name: (m.to_k.weight.detach().clone(), m.to_v.weight.detach().clone())
          for name, m in text_attention_modules(sd.unet)}
    return sd.fingerprint(), kv, sd.text_encoder.get_input_embeddings().weight.shape[1]


def perturbed(base, name, seed, aliases=(), fingerprint=None):
    """Make a concept whose K/V differ clearly from the base model's (a no-op load cannot pass)."""
    model_fingerprint, base_kv, dim = base
    g = torch.Generator().manual_seed(seed)
    kv = {n: tuple(w + 0.5 * w.std() * torch.randn(w.shape, generator=g) for w in pair)
          for n, pair in base_kv.items()}
    return Concept(name, 'mug', '<new1>', torch.randn(dim, generator=g) * 0.02, kv,
                   fingerprint or model_fingerprint, list(aliases))


@pytest.fixture(scope='module')
def concepts_dir(base, tmp_path_factory):
    """'my mug' (alias 'mug of mine', its appearance file a pickle) plus four folders the node must refuse."""
    folder = str(tmp_path_factory.mktemp('concepts'))
    mine = save_concept(perturbed(base, 'my mug', 1, aliases=['mug of mine']), folder)
    Path(mine, 'appearance.safetensors').write_bytes(b'\x80\x04not a prototype file')   # a pickle header
    save_concept(perturbed(base, 'foreign mug', 2, fingerprint='0123456789abcdef'), folder)
    corrupt = save_concept(perturbed(base, 'corrupt mug', 3), folder)
    Path(corrupt, KV_FILE).write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"broken": ')
    pickled = perturbed(base, 'pickled mug', 4)
    path = save_concept(pickled, folder)
    os.remove(os.path.join(path, KV_FILE))    # the diffusers .bin form: a pickle, never to be loaded
    torch.save(kv_state_dict(pickled.kv), os.path.join(path, 'pytorch_custom_diffusion_weights.bin'))
    disguised = perturbed(base, 'disguised mug', 5)
    torch.save(kv_state_dict(disguised.kv), os.path.join(save_concept(disguised, folder), KV_FILE))
    return folder


def subscribe_outputs(node):
    """Add the personal outputs and inputs of a node under test; returns the inboxes to unsubscribe."""
    client = node.client
    node.instances = client.subscribe(Image, node.topic('diffseg/instances'))
    node.assignments = client.subscribe(String, node.topic('diffseg/assignments'))
    node.markers = client.subscribe(MarkerArray, node.topic('diffseg/markers'))
    node.learn_status = client.subscribe(String, node.topic('diffseg/learn_status'), STATUS_QOS)
    node.learn_pub = client.publisher(String, node.topic('diffseg/learn'), RELIABLE)
    inboxes = [node.instances, node.assignments, node.markers, node.learn_status]
    assert all(client.wait_for_publishers(inbox) for inbox in inboxes[:3])
    assert client.wait_for_subscribers(node.learn_pub)
    return inboxes


@pytest.fixture(scope='module')
def diffseg(module_launcher, concepts_dir):
    node = module_launcher.start(f'concepts_dir:={concepts_dir}', *FAST_LEARN)
    node.depth_pub = node.client.publisher(Image, node.topic('depth'), BEST_EFFORT)
    node.info_pub = node.client.publisher(CameraInfo, node.topic('camera_info'), BEST_EFFORT)
    inboxes = subscribe_outputs(node)
    yield node
    for inbox in inboxes:
        node.client.unsubscribe(inbox)


def state_of(node):
    return json.loads(node.state.messages[-1].data)


def call_reload(node):
    client = node.client.node.create_client(Trigger, node.topic('diffseg/reload_concepts'))
    try:
        assert client.wait_for_service(timeout_sec=TIMEOUT)
        future = client.call_async(Trigger.Request())
        assert wait_until(future.done, TIMEOUT), 'no reply from ~/reload_concepts'
        return future.result()
    finally:
        node.client.node.destroy_client(client)


def camera_info(header):
    focal = 50.0
    return CameraInfo(header=header, width=WIDTH, height=HEIGHT, distortion_model='plumb_bob', d=[0.0] * 5,
                      k=[focal, 0.0, (WIDTH - 1) / 2, 0.0, focal, (HEIGHT - 1) / 2, 0.0, 0.0, 1.0])


def frame_sec(msg):
    return json.loads(msg.data)['header']['stamp']['sec']


def send_rgbd_until(node, first_index, accept, period=1.0):
    """Publish image + depth + camera_info with one header until ~/assignments answers one of those frames.

    Returns (assignments dict, header sent).
    """
    sent, answer = {}, None

    def answered():
        return next((m for m in list(node.assignments.messages) if frame_sec(m) in sent and accept(m)), None)
    for index in range(first_index, first_index + int(TIMEOUT / period)):
        header = make_header(index)
        sent[header.stamp.sec] = header
        node.depth_pub.publish(numpy_to_image_msg(np.full((HEIGHT, WIDTH), DEPTH_M, np.float32), '32FC1',
                                                  header))
        node.info_pub.publish(camera_info(header))
        node.image_pub.publish(make_image(index, WIDTH, HEIGHT))
        answer = wait_until(answered, period)
        if answer:
            break
    assert answer is not None, f'no assignments; log:\n{node.process.log}'
    return json.loads(answer.data), sent[frame_sec(answer)]


# --- concepts at start --------------------------------------------------------------------------------------
def test_refused_concept_files_are_named_and_the_node_serves(diffseg, concepts_dir):
    state = state_of(diffseg)
    assert [c['name'] for c in state['concepts']] == ['my mug']
    mine = state['concepts'][0]                # loads, scored by attention only: its appearance is refused
    assert mine.pop('appearance_error').endswith('is a pickle / torch archive, not safetensors; never loaded')
    assert mine == {'name': 'my mug', 'aliases': ['mug of mine'], 'class_word': 'mug', 'token': '<new1>',
                    'appearance': False}
    refused = {os.path.basename(r['folder']): r['error'] for r in state['refused_concepts']}
    assert set(refused) == set(REFUSED)
    for folder, fragment in REFUSED.items():
        assert fragment in refused[folder], refused[folder]
        assert diffseg.process.wait_for_log(rf'WARN.*concept refused: .*{folder}'), folder
    values = diffseg.wait_diagnostics(lambda v: v['concepts'] == 'my mug')
    assert values is not None and values['concepts refused'] == str(len(REFUSED))
    assert diffseg.process.running and 'Traceback' not in diffseg.process.log


def test_concept_names_resolve_in_the_query_state(diffseg):
    state = diffseg.send_query('my mug; blue bottle', expect=lambda s: s['mode'] == 'instances' and [
        q['text'] for q in s['queries']] == ['my mug', 'blue bottle'])
    assert state is not None, f'query not confirmed; log:\n{diffseg.process.log}'
    mine, plain = state['queries']
    assert mine == {'label': 1, 'text': 'my mug', 'prompt': '<new1> mug', 'concept': 'my mug',
                    'class_word': 'mug'}
    assert plain == {'label': 2, 'text': 'blue bottle', 'prompt': 'blue bottle', 'concept': None,
                     'class_word': None}


def test_my_mug_gets_instances_assignments_and_markers(diffseg):
    data, header = send_rgbd_until(diffseg, 500, accept=lambda m: json.loads(m.data)['depth']['used'])
    jsonschema.validate(data, SCHEMA)
    assert data['header'] == {'stamp': {'sec': header.stamp.sec, 'nanosec': header.stamp.nanosec},
                              'frame_id': header.frame_id}
    assert (data['mode'], data['width'], data['height']) == ('instances', WIDTH, HEIGHT)
    assert data['depth'] == {'used': True, 'frame_id': header.frame_id, 'note': ''}
    mine, plain = data['queries']
    assert (mine['phrase'], mine['concept'], mine['prompt']) == ('my mug', 'my mug', '<new1> mug')
    assert plain['concept'] is None
    instances_msg = diffseg.instances.wait_for(lambda m: m.header == header)
    assert instances_msg is not None, 'no ~/instances with the header of the answered frame'
    assert (instances_msg.encoding, instances_msg.width, instances_msg.height) == ('mono16', WIDTH, HEIGHT)
    instances = image_msg_to_numpy(instances_msg)
    assigned = [q for q in data['queries'] if q['instance_id']]
    assert mine in assigned, 'my mug was assigned no instance'
    for query in assigned:
        mask = instances == query['instance_id']
        assert query['pixels'] == mask.sum() > 0
        rows, cols = np.nonzero(mask)
        assert query['bbox'] == {'x': cols.min(), 'y': rows.min(), 'width': cols.max() - cols.min() + 1,
                                 'height': rows.max() - rows.min() + 1}
        assert query['centroid']['z'] == pytest.approx(DEPTH_M)
    markers = diffseg.markers.wait_for(lambda m: m.markers and m.markers[-1].header.stamp == header.stamp)
    assert markers is not None, 'no ~/markers for the answered frame'
    shown = [m for m in markers.markers if m.action == Marker.ADD]
    assert {(m.ns, m.id) for m in shown} == {(ns, q['label']) for q in assigned
                                             for ns in ('diffseg/label', 'diffseg/centroid')}
    for marker in shown:
        assert marker.header.frame_id == header.frame_id
        assert marker.lifetime.sec > 0 or marker.lifetime.nanosec > 0
        assert marker.type in (Marker.TEXT_VIEW_FACING, Marker.SPHERE)
    label = next(m for m in shown if m.type == Marker.TEXT_VIEW_FACING and m.id == 1)
    assert label.text.startswith('my mug')
    first = diffseg.markers.messages[0]
    assert first.markers[0].action == Marker.DELETEALL, 'the first markers must clear stale ones'


def test_alias_resolves_to_the_same_concept(diffseg):
    state = diffseg.send_query('mug of mine', expect=['mug of mine'])
    assert state is not None and state['queries'][0]['concept'] == 'my mug'
    assert state['queries'][0]['prompt'] == '<new1> mug'


# --- reload ------------------------------------------------------------------------------------------------
def test_reload_concepts_reports_loaded_and_refused(diffseg, concepts_dir, base):
    save_concept(perturbed(base, 'your mug', 6), concepts_dir)
    reply = call_reload(diffseg)
    assert not reply.success, 'refused folders are still there'
    assert "loaded 2 concept(s): 'my mug'" in reply.message and "'your mug'" in reply.message
    assert 'refused 4' in reply.message and 'corrupt-mug' in reply.message
    state = diffseg.send_query('your mug; my mug', expect=['your mug', 'my mug'])
    assert [q['concept'] for q in state['queries']] == ['your mug', 'my mug']
    assert {q['prompt'] for q in state['queries']} == {'<new1> mug', '<new2> mug'}
    for folder in REFUSED:
        shutil.rmtree(os.path.join(concepts_dir, folder))
    reply = call_reload(diffseg)
    assert reply.success and reply.message.startswith('loaded 2 concept(s)'), reply.message
    assert diffseg.state.wait_for(lambda m: json.loads(m.data)['refused_concepts'] == [])
    assert diffseg.process.running


# --- learn requests that fail -------------------------------------------------------------------------------
def wait_learn(node, job_id, states=('done', 'failed'), timeout=TIMEOUT):
    """Wait for a learn status of this job in one of states; return it as a dict."""
    msg = node.learn_status.wait_for(lambda m: json.loads(m.data)['id'] == job_id and json.loads(
        m.data)['state'] in states, timeout=timeout)
    assert msg is not None, f'no learn status {states} for request {job_id}; log:\n{node.process.log}'
    return json.loads(msg.data)


@pytest.mark.parametrize('text, fragment', [('teach me my mug', "must be 'name = class word'"),
                                            ('../../etc = mug', 'path separator'),
                                            ('mug of mine = cup', "already names the concept 'my mug'")])
def test_bad_learn_request_is_reported_failed_and_changes_nothing(diffseg, concepts_dir, text, fragment):
    before = sorted(os.listdir(concepts_dir))
    start = diffseg.learn_status.count()
    diffseg.learn_pub.publish(String(data=text))
    msg = diffseg.learn_status.wait_for(lambda m: json.loads(m.data)['state'] == 'failed', start=start)
    assert msg is not None, f'no failed status; log:\n{diffseg.process.log}'
    status = json.loads(msg.data)
    assert fragment in status['message'] and status['request'] == text
    assert sorted(os.listdir(concepts_dir)) == before and diffseg.process.running


def test_cancel_ends_the_collecting_learn_request(diffseg, concepts_dir):
    before = sorted(os.listdir(concepts_dir))

    def published(request, state, start):
        msg = diffseg.learn_status.wait_for(lambda m: (json.loads(m.data)['request'], json.loads(
            m.data)['state']) == (request, state), start=start)
        assert msg is not None, f'no {state} status of {request!r}; log:\n{diffseg.process.log}'
        return json.loads(msg.data)
    start = diffseg.learn_status.count()
    diffseg.learn_pub.publish(String(data='your mug = mug'))
    collecting = published('your mug = mug', 'collecting', start)      # no frame arrives: it keeps waiting
    diffseg.learn_pub.publish(String(data='Cancel'))
    assert wait_learn(diffseg, collecting['id'], states=('failed',))['message'] == 'cancelled by request'
    start = diffseg.learn_status.count()
    diffseg.learn_pub.publish(String(data='cancel'))
    assert 'nothing to cancel' in published('cancel', 'failed', start)['message']
    assert sorted(os.listdir(concepts_dir)) == before and diffseg.process.running


def test_node_stops_cleanly(diffseg):
    assert diffseg.process.stop() == 0
    assert 'Traceback' not in diffseg.process.log and '[ERROR]' not in diffseg.process.log, \
        diffseg.process.log


# --- learning from the SynthWorld camera --------------------------------------------------------------------
def test_learn_from_the_synth_camera_then_query_the_concept(launcher, tmp_path):
    concepts = tmp_path / 'concepts'          # created by the first learned concept
    # The camera publishes camera/{image,depth,camera_info} in /synth; the node lives in /synth/camera.
    node = launcher.start(f'concepts_dir:={concepts}', 'learn.frames:=3', 'learn.steps:=40', *FAST_LEARN,
                          namespace='/synth/camera')
    inboxes = subscribe_outputs(node)
    camera = NodeProcess('diffseg_ros.ros.synth_camera',
                         ['-r', '__ns:=/synth', '-p', f'width:={WIDTH}', '-p', f'height:={HEIGHT}',
                          '-p', 'rate:=8.0', '-p', 'scenes:=2', '-p', 'frames_per_scene:=4', '-p', 'seed:=3'],
                         tmp_path / 'synth_camera.log')
    try:
        # Segmentation of a plain query goes on while the concept trains.
        assert node.send_query('bottle', expect=['bottle']) is not None
        assert node.outputs['semantic'].wait_for() is not None, f'no output; log:\n{node.process.log}'
        node.learn_pub.publish(String(data='my mug = mug'))
        wait_learn(node, 1, states=('collecting',))
        node.learn_pub.publish(String(data='your mug = mug'))     # one learn at a time
        busy = wait_learn(node, 2)
        assert busy['state'] == 'failed' and busy['message'].startswith("busy: still learning 'my mug'")
        done = wait_learn(node, 1, timeout=TIMEOUT * 3)
        assert done['state'] == 'done', done
        assert (done['name'], done['class_word'], done['frames']) == ('my mug', 'mug', 3)
        assert done['progress'] == 1.0
        assert node.wait_diagnostics(lambda v: v['learn'] == "'my mug = mug': done 100%" and
                                     v['concepts'] == 'my mug') is not None
        assert done['crops'] >= 1 and '"<new1> mug"' in done['message']
        mine = [json.loads(m.data) for m in node.learn_status.messages if json.loads(m.data)['id'] == 1]
        states = [s['state'] for s in mine]
        assert states[0] == 'queued' and states[-1] == 'done'
        assert states.index('collecting') < states.index('training') < len(states) - 1
        assert [s['progress'] for s in mine] == sorted(s['progress'] for s in mine)
        assert sorted(os.listdir(concepts / 'my-mug')) == sorted(['<new1>.safetensors', KV_FILE,
                                                                  'concept.json', 'appearance.safetensors'])
        training = [t for m, t in zip(node.learn_status.messages, node.learn_status.arrivals)
                    if json.loads(m.data)['id'] == 1 and json.loads(m.data)['state'] == 'training']
        finished = node.learn_status.arrivals[node.learn_status.messages.index(
            next(m for m in node.learn_status.messages if json.loads(m.data) == done))]
        assert any(training[0] < t < finished for t in node.outputs['semantic'].arrivals), \
            'segmentation stopped while the concept trained'
        # The learned concept is loaded and usable, with centroids from the camera's depth.
        state = node.send_query('my mug', expect=lambda s: s['queries'] and s['queries'][0]['concept'])
        assert state is not None and state['queries'][0]['prompt'] == '<new1> mug'
        start = node.assignments.count()
        answer = node.assignments.wait_for(lambda m: json.loads(m.data)['mode'] == 'instances' and json.loads(
            m.data)['depth']['used'], start=start)
        assert answer is not None, f'no assignments for my mug; log:\n{node.process.log}'
        data = json.loads(answer.data)
        jsonschema.validate(data, SCHEMA)
        assert data['header']['frame_id'] == 'camera_optical_frame'
        assert data['queries'][0]['concept'] == 'my mug'
        # ~/learn stored the concept's appearance (above); the answer says what each evidence gave
        assert state['concepts'][0]['appearance'] is True
        evidence = data['queries'][0]['evidence']
        assert set(evidence) == {'subject', 'context', 'appearance', 'class'}
        assert evidence['subject']['raw'] is not None and evidence['appearance']['raw'] is not None
        assert node.process.stop() == 0 and 'Traceback' not in node.process.log, node.process.log
    finally:
        assert camera.stop() == 0, camera.log
        for inbox in inboxes:
            node.client.unsubscribe(inbox)
