"""Both nodes as managed nodes, driven over real DDS through their lifecycle_msgs services.

The nodes start with autostart:=false and wait unconfigured (no model loaded); the test client moves them
through configure, activate, deactivate, cleanup and shutdown, as `ros2 lifecycle set` would.
"""
import itertools

from lifecycle_msgs.srv import ChangeState, GetState
import pytest

from diffseg_ros.ros.synth_camera import frame_sequence
from ros_harness import DiffsegUnderTest, make_header, NodeProcess, TIMEOUT, wait_until
from test_ldmseg_node import HEIGHT, LDMSegUnderTest, MODULE as LDMSEG_MODULE, PARAMS_FILE as LDMSEG_PARAMS
from test_ldmseg_node import truth_cloud, WIDTH

QUIET = 3.0   # seconds of frames a paused node gets to (not) answer


class Lifecycle:
    """The ~/change_state and ~/get_state services of one managed node."""

    def __init__(self, client, node):
        self.client = client
        self.change = client.service_client(ChangeState, f'{node}/change_state')
        self.get = client.service_client(GetState, f'{node}/get_state')

    def state(self):
        """Return the node's state label, asking again when an answer is lost.

        A service's first reply can be dropped while DDS still matches its reply path ("failed to send
        response (timeout)" in the node's log); GetState can be asked twice, unlike ChangeState.
        """
        for _ in range(3):
            reply = self.client.call(self.get, GetState.Request(), timeout=TIMEOUT / 3)
            if reply is not None:
                return reply.current_state.label
        raise AssertionError(f'no answer from {self.get.srv_name}')

    def set(self, transition):
        """Ask for a transition by label ('configure', 'activate', ...); return whether it succeeded."""
        request = ChangeState.Request()
        request.transition.label = transition
        return self.client.call(self.change, request).success


def no_answer(node, first_index):
    """Publish frames for QUIET seconds; return True when none of them was answered on ~/semantic."""
    answer, _ = node.send_images_until(node.outputs['semantic'], first_index, timeout=QUIET)
    return answer is None


@pytest.fixture
def managed_diffseg(launcher, ros_client):
    process, namespace = launcher.start_process('autostart:=false')
    node = DiffsegUnderTest(ros_client, process, namespace)
    launcher.nodes.append(node)
    return node, Lifecycle(ros_client, f'{namespace}/diffseg')


def test_diffseg_waits_unconfigured_without_a_model(managed_diffseg):
    node, lifecycle = managed_diffseg
    assert lifecycle.state() == 'unconfigured'
    values = node.wait_diagnostics(lambda v: v['lifecycle state'] == 'unconfigured')
    assert values is not None and 'no model loaded' in values['message'] and 'model' not in values
    assert 'loading model' not in node.process.log
    assert not lifecycle.set('activate')   # nothing to activate before configure


def test_diffseg_configure_activate_deactivate_cleanup_and_again(managed_diffseg):
    node, lifecycle = managed_diffseg
    assert lifecycle.set('configure') and lifecycle.state() == 'inactive'
    values = node.wait_diagnostics(lambda v: v['lifecycle state'] == 'inactive')
    assert values['model'] and 'model loaded' in values['message'], values
    assert node.image_pub.get_subscription_count() == 0, 'inputs open before activate'

    assert lifecycle.set('activate') and lifecycle.state() == 'active'
    assert node.wait_until_up() and node.wait_connected()
    assert node.send_query('red mug', expect=['red mug']) is not None
    answer, _ = node.send_images_until(node.outputs['semantic'], first_index=1)
    assert answer is not None, node.process.log

    assert lifecycle.set('deactivate') and lifecycle.state() == 'inactive'
    assert wait_until(lambda: node.image_pub.get_subscription_count() == 0), 'inputs still open'
    assert no_answer(node, first_index=100)

    assert lifecycle.set('cleanup') and lifecycle.state() == 'unconfigured'
    values = node.wait_diagnostics(lambda v: v['lifecycle state'] == 'unconfigured')
    assert 'no model loaded' in values['message'] and 'model' not in values, values

    before = node.state.count()
    assert lifecycle.set('configure') and lifecycle.set('activate')
    assert node.wait_connected()
    # The query set before the cleanup applies to the new engine: no new query needed.
    assert node.state.wait_for(lambda m: '"text": "red mug"' in m.data, start=before), node.process.log
    answer, _ = node.send_images_until(node.outputs['semantic'], first_index=200)
    assert answer is not None, node.process.log
    assert node.process.log.count('loading model') == 2

    assert lifecycle.set('shutdown') and lifecycle.state() == 'finalized'
    assert no_answer(node, first_index=300)
    assert node.process.stop() == 0 and 'Traceback' not in node.process.log, node.process.log


def test_a_failed_configure_stays_unconfigured_and_says_why(launcher, ros_client, tmp_path):
    missing = tmp_path / 'no-such-model'
    process, namespace = launcher.start_process('autostart:=false', model_path=missing)
    lifecycle = Lifecycle(ros_client, f'{namespace}/diffseg')
    assert not lifecycle.set('configure') and lifecycle.state() == 'unconfigured'
    assert process.wait_for_log(rf'configure failed: ModelLoadError: .*{missing}'), process.log
    assert process.running, 'a failed configure must leave the node waiting for the next one'


@pytest.fixture(scope='module')
def ldmseg_dir(tmp_path_factory):
    from tiny_models import tiny_random_ldmseg
    return tiny_random_ldmseg(seed=0).save(str(tmp_path_factory.mktemp('tiny-ldmseg')))


def test_ldmseg_configure_activate_deactivate(ros_client, ldmseg_dir, tmp_path):
    namespace = '/managed_ldmseg'
    process = NodeProcess(LDMSEG_MODULE, ['--params-file', str(LDMSEG_PARAMS), '-r', f'__ns:={namespace}',
                                          '-p', f'model_path:={ldmseg_dir}', '-p', 'steps:=2',
                                          '-p', 'autostart:=false', '-p', 'diagnostics_period:=0.5',
                                          '-p', 'qos.image.reliability:=reliable',
                                          '-p', 'qos.points.reliability:=reliable'],
                          tmp_path / 'ldmseg.log')
    node = LDMSegUnderTest(ros_client, process, namespace)
    try:
        lifecycle = Lifecycle(ros_client, f'{namespace}/ldmseg')
        assert lifecycle.state() == 'unconfigured'
        assert node.wait_diagnostics(lambda v: 'no model loaded' in v['message']) is not None
        assert lifecycle.set('configure') and lifecycle.state() == 'inactive'
        assert 'loading LDMSeg' in process.log and 'ready: completing' not in process.log
        assert lifecycle.set('activate') and lifecycle.state() == 'active'
        node.wait_up()
        frames = list(itertools.islice(frame_sequence(3, 1, 30, WIDTH, HEIGHT), 2))
        node.points_pub.publish(truth_cloud(frames[0], make_header(1)))
        node.complete(1, frames[0])   # asserts an answer

        assert lifecycle.set('deactivate') and lifecycle.state() == 'inactive'
        assert wait_until(lambda: node.pubs['image'].get_subscription_count() == 0), 'inputs still open'
        start = node.instances.count()
        for index in range(10, 10 + int(QUIET / 0.5)):
            node.publish_frame(index, frames[1])
            assert node.instances.wait_for(start=start, timeout=0.5) is None, 'a paused node answered'
    finally:
        code = node.close()
    assert code == 0 and 'Traceback' not in process.log, process.log
