"""Other Stable Diffusion layouts through the real node over real DDS (issue 19, item 1).

The node starts on each folder with the model's own input size (image_size:=0), answers a query and a
frame with outputs at the frame's size; an SDXL-style folder is refused in one clear line.
"""
import pytest

from diffseg_ros.ros.image_codec import image_msg_to_numpy
from diffseg_ros.ros.segmentation_node import EXIT_BAD_PARAMETER, EXIT_MODEL_ERROR
from test_node_startup import assert_clear_failure
from tiny_models import save_tiny_layout


@pytest.mark.parametrize('layout, method', [('sd1', 'cross'), ('two_level', 't2m'), ('three_level', 't2m'),
                                            ('sd2', 'stableseg')])
def test_node_serves_a_layout_at_the_models_own_size(launcher, tmp_path, layout, method):
    folder = save_tiny_layout(layout, str(tmp_path / layout))
    node = launcher.start('image_size:=0', f'method:={method}', model_path=folder)
    state = node.send_query('red mug; blue bottle', expect=['red mug', 'blue bottle'])
    assert state is not None and state['method'] == method, node.process.log
    semantic, sent = node.send_images_until(node.outputs['semantic'], first_index=1, width=96, height=72)
    assert semantic is not None, f'no ~/semantic from the {layout} model; log:\n{node.process.log}'
    assert semantic.header == sent[semantic.header.stamp.sec]
    labels = image_msg_to_numpy(semantic)
    assert labels.shape == (72, 96) and labels.max() <= 2
    assert 'Traceback' not in node.process.log and '[ERROR]' not in node.process.log, node.process.log


def test_node_refuses_an_sdxl_style_folder_in_one_line(launcher, tmp_path):
    folder = save_tiny_layout('sdxl', str(tmp_path / 'sdxl'))
    process, _ = launcher.start_process(model_path=folder)
    assert_clear_failure(process, EXIT_MODEL_ERROR, 'cannot load model', 'SDXL-style', 'SD 1.x / 2.x')


def test_node_refuses_chosen_layers_over_the_attention_budget(launcher, tmp_path):
    folder = save_tiny_layout('two_level', str(tmp_path / 'two_level'))
    process, _ = launcher.start_process('image_size:=256', 'method:=t2m', 'self_layers:=[0]',
                                        'max_attention_mb:=256', model_path=folder)
    assert_clear_failure(process, EXIT_BAD_PARAMETER, 'invalid parameter', 'max_attention_mb 256')
