"""Starting and stopping diffseg: bad parameters and model folders fail clearly, SIGINT is clean."""
import json
import shutil

import pytest

from diffseg_ros.ros.segmentation_node import EXIT_BAD_PARAMETER, EXIT_MODEL_ERROR


def assert_clear_failure(process, code, *fragments):
    """Check the process exited with code, logging one error line with every fragment, no traceback."""
    assert process.wait_exit() == code, process.log
    log = process.log
    assert 'Traceback' not in log, log
    error_lines = [line for line in log.splitlines() if '[ERROR]' in line]
    assert len(error_lines) == 1, log
    for fragment in fragments:
        assert fragment in error_lines[0], log


def test_missing_model_folder_names_the_path(launcher, tmp_path):
    missing = tmp_path / 'no-such-model'
    process, _ = launcher.start_process(model_path=missing)
    assert_clear_failure(process, EXIT_MODEL_ERROR, 'cannot load model', str(missing))


def test_incomplete_model_folder_names_the_missing_files(launcher, tmp_path):
    (tmp_path / 'unet').mkdir()
    (tmp_path / 'unet' / 'config.json').write_text('{}')
    process, _ = launcher.start_process(model_path=tmp_path)
    assert_clear_failure(process, EXIT_MODEL_ERROR, 'cannot load model', str(tmp_path), 'vae/config.json',
                         'text_encoder/config.json')


@pytest.mark.parametrize('param, message', [
    ('method:=kmeans',
     "invalid parameter: method must be one of '', 'cross', 'stableseg', 't2m', 'iosd', got 'kmeans'"),
    ('noise_samples:=many', "invalid parameter: noise_samples: Trying to set parameter 'noise_samples' to "
                            "'many' of type 'STRING', expecting type 'INTEGER'"),
    ('qos.image.reliability:=sometimes', "qos.image.reliability must be 'best_effort' or 'reliable'"),
    ('overlay_alpha:=1.5', 'overlay_alpha must be in [0, 1], got 1.5'),
    ('cross_layers:=[99]', 'unknown attention layer 99'),
])
def test_bad_parameter_is_one_clear_error(launcher, param, message):
    process, _ = launcher.start_process(param)
    assert_clear_failure(process, EXIT_BAD_PARAMETER, message)


def test_sigint_stops_cleanly(launcher):
    node = launcher.start()
    assert node.process.stop() == 0
    assert 'Traceback' not in node.process.log and '[ERROR]' not in node.process.log, node.process.log


def _recommending(tiny_model_dir, folder, defaults_text):
    shutil.copytree(tiny_model_dir, folder)
    (folder / 'diffseg_defaults.json').write_text(defaults_text)
    return folder


def test_the_models_recommended_method_is_used_and_reported(launcher, tiny_model_dir, tmp_path):
    folder = _recommending(tiny_model_dir, tmp_path / 'recommends',
                           json.dumps({'method': 'cross', 'crf': True}))
    node = launcher.start(model_path=folder)     # config/diffseg.yaml leaves method '' (the model's choice)
    assert node.send_query('red mug', expect=['red mug'])['method'] == 'cross'
    assert json.loads(node.state.wait_for().data)['crf'] is True
    assert 'method cross + dense CRF' in node.process.log
    semantic, _ = node.send_images_until(node.outputs['semantic'], first_index=1)
    assert semantic is not None, f'no answer with the recommended cross + CRF; log:\n{node.process.log}'
    explicit = launcher.start('method:=t2m', model_path=folder)
    state = json.loads(explicit.state.wait_for().data)
    assert (state['method'], state['crf']) == ('t2m', False)


def test_a_bad_model_defaults_file_is_a_clear_model_error(launcher, tiny_model_dir, tmp_path):
    folder = _recommending(tiny_model_dir, tmp_path / 'bad', json.dumps({'method': 'kmeans'}))
    process, _ = launcher.start_process(model_path=folder)
    assert_clear_failure(process, EXIT_MODEL_ERROR, 'cannot load model', "unknown method 'kmeans'")
