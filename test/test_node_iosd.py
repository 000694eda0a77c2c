"""The diffseg node with method iosd over real DDS.

The embedded head is loaded and named on ~/queries; a present object is segmented and an absent one gets no
pixel, exactly as the core segmenter answers; a head of another base model stops the node with one clear
error line.
"""
import numpy as np
import pytest

from diffseg_ros.core.masks import iou
from diffseg_ros.core.sd_models import EMBEDDED_MODEL
from diffseg_ros.core.segmenter import Segmenter, SegmenterConfig
from diffseg_ros.ros.image_codec import image_msg_to_numpy, numpy_to_image_msg
from diffseg_ros.ros.segmentation_node import EXIT_MODEL_ERROR
from diffseg_ros.synthworld import generate_scene
from diffseg_ros.tools.evaluate import absent_queries
from ros_harness import make_header, TIMEOUT
from test_node_startup import assert_clear_failure

EMBEDDED_HEAD = f'{EMBEDDED_MODEL}/heads/iosd'
SCENE_SEED = 3_000_000_100      # a validation scene: never trained on
IMAGE_SIZE = 256


@pytest.fixture(scope='module')
def case():
    """Return a scene, a present and an absent object's phrase, and the labels the core segmenter gives.

    The absent phrase is one the head leaves empty; the node must publish the same labels.
    """
    scene = generate_scene(SCENE_SEED, width=128, height=128)
    seg = Segmenter(SegmenterConfig(method='iosd', image_size=IMAGE_SIZE))
    for obj in scene.objects:
        for absent in absent_queries(scene):
            result = seg.segment(scene.rgb, [obj.phrase, absent])
            found = iou(result.masks[0], scene.instances == obj.instance_id) > 0.4
            if found and result.masks[1].mean() <= 0.01:
                return scene, obj.phrase, absent, result.labels
    pytest.skip('no present / absent pair the head answers on this scene')


@pytest.fixture(scope='module')
def iosd_node(module_launcher):
    return module_launcher.start('method:=iosd', f'image_size:={IMAGE_SIZE}', model_path=EMBEDDED_MODEL)


def test_state_names_the_loaded_head(iosd_node, case):
    _, present, absent, _ = case
    state = iosd_node.send_query(f'{present}; {absent}', expect=[present, absent])
    assert state is not None, f'query not confirmed; log:\n{iosd_node.process.log}'
    assert state['method'] == 'iosd'
    head = state['head']
    assert head['name'] == 'iosd' and head['base_model'] == 'sd-synthworld' and head['path'] == EMBEDDED_HEAD


def test_present_object_found_and_absent_object_empty(iosd_node, case):
    scene, _, _, expected = case
    inbox = iosd_node.outputs['semantic']
    start = inbox.count()

    def frame():
        return numpy_to_image_msg(scene.rgb, 'rgb8', make_header(1))
    answered = iosd_node.publish_until(iosd_node.image_pub, frame, lambda: inbox.count() > start,
                                       period=2.0, timeout=TIMEOUT)
    assert answered, f'no ~/semantic output; log:\n{iosd_node.process.log}'
    labels = image_msg_to_numpy(inbox.wait_for(start=start))
    np.testing.assert_array_equal(labels, expected)
    assert np.mean(labels == 2) <= 0.01


def test_head_of_another_base_model_is_refused(launcher):
    process, _ = launcher.start_process('method:=iosd', f'head_path:={EMBEDDED_HEAD}')
    assert_clear_failure(process, EXIT_MODEL_ERROR, 'cannot load model', 'trained on base model',
                         'sd-synthworld', 'diffseg train head')
