"""The diffseg node over real DDS, as a separate process: queries, outputs, headers, state, diagnostics.

One node serves the whole module; the tests run in file order (images before any query come first).
"""
import json

from diagnostic_msgs.msg import DiagnosticStatus
import numpy as np
import pytest
from rcl_interfaces.msg import Parameter as ParameterMsg, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from std_msgs.msg import String

from diffseg_ros.ros.image_codec import image_msg_to_numpy
from ros_harness import LATCHED, make_image, TIMEOUT, wait_until

OK, WARN, ERROR = (int.from_bytes(level, 'little') for level in
                   (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR))
QUERIES = ['red mug', 'blue bottle']


@pytest.fixture(scope='module')
def diffseg(module_launcher):
    return module_launcher.start()


def stamp_sec(msg):
    return msg.header.stamp.sec


def test_starts_with_empty_latched_state(diffseg):
    state = json.loads(diffseg.state.wait_for().data)
    assert state == {'queries': [], 'method': 't2m', 'crf': False, 'head': None, 'layer_weights': 'uniform',
                     'mode': 'semantic', 'truncated': [], 'warnings': [], 'concepts': [],
                     'refused_concepts': []}


def test_images_before_any_query_publish_nothing_and_warn(diffseg):
    values = diffseg.publish_until(diffseg.image_pub, lambda: make_image(0), lambda: diffseg.wait_diagnostics(
        lambda v: int(v['frames without query']) > 0, timeout=1.0))
    assert values is not None, 'no diagnostics counting frames that arrived without a query'
    assert values['level'] == WARN and 'no query' in values['message']
    assert values['queries'] == '' and values['frames processed'] == '0'
    assert all(inbox.count() == 0 for inbox in diffseg.outputs.values())


def test_query_is_confirmed_on_latched_state_topic(diffseg):
    state = diffseg.send_query(' red mug ;blue bottle; ', expect=QUERIES)
    assert state is not None, f'query not confirmed; log:\n{diffseg.process.log}'
    plain = {'concept': None, 'class_word': None}
    assert state['queries'] == [dict(plain, label=1, text='red mug', prompt='red mug'),
                                dict(plain, label=2, text='blue bottle', prompt='blue bottle')]
    assert state['method'] == 't2m' and state['mode'] == 'semantic' and state['truncated'] == []


def test_late_subscriber_receives_the_state(diffseg):
    late = diffseg.client.subscribe(String, diffseg.topic('diffseg/queries'), LATCHED)
    try:
        msg = late.wait_for(lambda m: json.loads(m.data)['queries'])
        assert msg is not None, 'a late subscriber did not get the transient-local state'
        assert [q['text'] for q in json.loads(msg.data)['queries']] == QUERIES
    finally:
        diffseg.client.unsubscribe(late)


def test_every_output_has_the_source_header_and_size(diffseg):
    semantic, sent = diffseg.send_images_until(diffseg.outputs['semantic'], first_index=100)
    assert semantic is not None, f'no ~/semantic output; log:\n{diffseg.process.log}'
    source = sent[stamp_sec(semantic)]
    assert semantic.header == source
    same_frame = {}
    for name in ('mask', 'overlay'):
        same_frame[name] = diffseg.outputs[name].wait_for(lambda m: m.header == source)
        assert same_frame[name] is not None, f'no ~/{name} for the frame answered on ~/semantic'
    assert (semantic.encoding, semantic.width, semantic.height) == ('mono8', 64, 48)
    mask_msg = same_frame['mask']
    assert (mask_msg.encoding, mask_msg.width, mask_msg.height) == ('mono8', 64, 48)
    assert (same_frame['overlay'].encoding, same_frame['overlay'].width) == ('rgb8', 64)
    labels = image_msg_to_numpy(semantic)
    mask = image_msg_to_numpy(mask_msg)
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, labels == 1)
    assert image_msg_to_numpy(same_frame['overlay']).shape == (48, 64, 3)


@pytest.mark.parametrize('encoding, width, height', [('bgr8', 80, 60), ('mono8', 40, 32), ('rgba8', 64, 64)])
def test_other_colour_encodings_are_served(diffseg, encoding, width, height):
    output, sent = diffseg.send_images_until(diffseg.outputs['semantic'], first_index=200 + width,
                                             encoding=encoding, width=width, height=height)
    assert output is not None, f'no output for {encoding}; log:\n{diffseg.process.log}'
    assert output.header == sent[stamp_sec(output)]
    assert (output.width, output.height) == (width, height)


def test_diagnostics_report_the_running_state(diffseg, tiny_model_dir):
    values = diffseg.wait_diagnostics(lambda v: int(v['frames processed']) > 0 and v['level'] == OK)
    assert values is not None, 'no OK diagnostics after processed frames'
    assert values['hardware_id'] == values['model'] == tiny_model_dir
    assert (values['device'], values['dtype'], values['method']) == ('cpu', 'float32', 't2m')
    assert values['queries'] == 'red mug; blue bottle'
    assert float(values['inference latency mean (s)']) > 0
    assert float(values['result age (s)']) > 0   # stamps of the test frames are from 1970
    assert int(values['frames received']) >= int(values['frames processed']) + int(values['frames dropped'])
    assert values['last error'] == ''


def test_query_cleaning_of_control_replacement_and_duplicate_text(diffseg):
    state = diffseg.send_query('red mug;; Red  Mug ;\x07blue\tbottle\ufffd;\x00', expect=QUERIES)
    assert state is not None, f'cleaned query not confirmed; log:\n{diffseg.process.log}'
    assert any('control or invalid characters' in warning for warning in state['warnings'])


def test_too_many_queries_are_cut_and_named(diffseg):
    phrases = [f'object {i}' for i in range(20)]
    state = diffseg.send_query('; '.join(phrases), expect=phrases[:16])
    assert state is not None, f'16-query prefix not confirmed; log:\n{diffseg.process.log}'
    assert state['truncated'] == phrases[16:]


def test_prompt_over_token_limit_is_truncated_with_warning(diffseg):
    phrases = [f'very large shiny {colour} ceramic coffee mug' for colour in
               ('red', 'green', 'blue', 'yellow', 'white', 'black', 'purple', 'orange', 'pink', 'grey',
                'brown', 'golden')]

    def kept_prefix_and_named_rest(state):
        return state['truncated'] and [q['text'] for q in state['queries']] + state['truncated'] == phrases
    state = diffseg.send_query('; '.join(phrases), expect=kept_prefix_and_named_rest)
    assert state is not None, f'no truncation reported; log:\n{diffseg.process.log}'
    assert diffseg.process.wait_for_log(r'WARN.*dropped: .*' + state['truncated'][-1])


def test_runtime_parameters_are_validated(diffseg):
    client = diffseg.client.node.create_client(SetParameters, diffseg.topic('diffseg/set_parameters'))
    try:
        assert client.wait_for_service(timeout_sec=TIMEOUT)

        def set_param(name, value):
            if isinstance(value, float):
                typed = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
            else:
                typed = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)
            msg = ParameterMsg(name=name, value=typed)
            future = client.call_async(SetParameters.Request(parameters=[msg]))
            assert wait_until(future.done, TIMEOUT)
            return future.result().results[0]
        assert set_param('box_threshold', 0.3).successful
        assert set_param('overlay_alpha', 0.8).successful
        refused = set_param('box_threshold', 5.0)
        assert not refused.successful and 'box_threshold' in refused.reason
        refused = set_param('overlay_alpha', -1.0)
        assert not refused.successful and 'overlay_alpha' in refused.reason
        assert not set_param('model_path', '/elsewhere').successful   # read-only
    finally:
        diffseg.client.node.destroy_client(client)


def test_empty_query_clears_and_stops_output(diffseg):
    state = diffseg.send_query('  ;  ', expect=[])
    assert state is not None and state['queries'] == []
    before = diffseg.outputs['semantic'].wait_quiet(quiet=2.0)
    waiting_before = int(diffseg.wait_diagnostics(lambda v: True)['frames without query'])

    def warns_without_query(values):
        waiting = int(values['frames without query'])
        return values['level'] == WARN and values['queries'] == '' and waiting > waiting_before
    values = diffseg.publish_until(diffseg.image_pub, lambda: make_image(300),
                                   lambda: diffseg.wait_diagnostics(warns_without_query, timeout=1.0))
    assert values is not None, 'diagnostics do not warn about images without a query'
    assert diffseg.outputs['semantic'].count() == before
