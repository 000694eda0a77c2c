"""The ldmseg node as a separate process over real DDS, with a tiny random LDMSeg saved to a temporary folder.

Checks the plumbing, not the model's quality: a random model adds no segments of its own, so the ids the node
publishes are the ids of the cloud where the cloud projects, and void elsewhere.
"""
import itertools

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField

from diffseg_ros.core.geometry import depth_to_points, invert_pose, transform_points
from diffseg_ros.ldmseg import project_labels
from diffseg_ros.ros.image_codec import compressed_image_msg, image_msg_to_numpy, numpy_to_image_msg
from diffseg_ros.ros.ldmseg_node import STATUS_NAME
from diffseg_ros.ros.pointcloud import camera_info_msg, labelled_cloud_msg, read_labelled_cloud
from diffseg_ros.ros.synth_camera import frame_sequence
from ros_harness import diagnostic_values, make_header, NodeProcess, REPO, TIMEOUT, wait_until

WIDTH, HEIGHT = 64, 48
ERROR = int.from_bytes(DiagnosticStatus.ERROR, 'little')
MODULE = 'diffseg_ros.ros.ldmseg_node'
PARAMS_FILE = REPO / 'config' / 'ldmseg.yaml'
_namespaces = itertools.count(1)


@pytest.fixture(scope='module')
def ldmseg_dir(tmp_path_factory):
    from tiny_models import tiny_random_ldmseg
    return tiny_random_ldmseg(seed=0).save(str(tmp_path_factory.mktemp('tiny-ldmseg')))


@pytest.fixture(scope='module')
def sequence():
    """Render the first frames of a moving-camera SynthWorld orbit."""
    return list(itertools.islice(frame_sequence(3, 1, 30, WIDTH, HEIGHT), 5))


def truth_cloud(frame, header):
    """Make the SynthWorld camera's labelled cloud of a frame (its depth lifted, truth instance ids)."""
    points = depth_to_points(frame.depth, frame.K).astype(np.float32)
    return labelled_cloud_msg(points, frame.instances, header)


def cloud_arrays(msg):
    xyz, labels = read_labelled_cloud(msg)
    return xyz.reshape(msg.height, msg.width, 3), labels.reshape(msg.height, msg.width)


class LDMSegUnderTest:
    """One ldmseg node process in its own namespace, with the test's publishers and inboxes."""

    def __init__(self, client, process, namespace, points_topic='points', inputs=True):
        self.client, self.process, self.namespace = client, process, namespace
        topics = {'image': Image, 'depth': Image, 'camera_info': CameraInfo, points_topic: PointCloud2}
        topics = topics if inputs else {}   # inputs remapped elsewhere: the test does not publish them
        self.pubs = {name: client.publisher(kind, f'{namespace}/{name}') for name, kind in topics.items()}
        self.points_pub = self.pubs.get(points_topic)
        self.instances = client.subscribe(Image, f'{namespace}/ldmseg/instances')
        self.labeled_points = client.subscribe(PointCloud2, f'{namespace}/ldmseg/labeled_points')
        self.diagnostics = client.subscribe(DiagnosticArray, '/diagnostics')

    def wait_up(self):
        if not self.process.wait_for_log(r'ready: completing', timeout=TIMEOUT * 2):
            code = self.process.stop()
            raise AssertionError(f'ldmseg did not come up (exit code {code}):\n{self.process.log}')
        connected = [self.client.wait_for_subscribers(pub) for pub in self.pubs.values()]
        connected += [self.client.wait_for_publishers(inbox)
                      for inbox in (self.instances, self.labeled_points)]
        assert all(connected), 'discovery did not match the test client with the node'

    def publish_frame(self, index, frame, depth_msg=None):
        header = make_header(index)
        self.pubs['camera_info'].publish(camera_info_msg(frame.K, WIDTH, HEIGHT, header))
        self.pubs['image'].publish(numpy_to_image_msg(frame.rgb, 'rgb8', header))
        depth_msg = depth_msg or numpy_to_image_msg(frame.depth.astype(np.float32), '32FC1')
        depth_msg.header = header
        self.pubs['depth'].publish(depth_msg)

    def complete(self, index, frame, depth_msg=None, period=2.0):
        """Publish a frame (stamp index) until ~/instances answers it; return (instances, labeled_points)."""
        sec = make_header(index).stamp.sec
        start = self.instances.count()
        answered = None
        deadline = TIMEOUT
        while answered is None and deadline > 0:   # the cloud may not have arrived at the first try
            self.publish_frame(index, frame, depth_msg)
            answered = self.instances.wait_for(lambda m: m.header.stamp.sec == sec, period, start)
            deadline -= period
        assert answered is not None, f'no answer to frame {index}; log:\n{self.process.log}'
        points = self.labeled_points.wait_for(lambda m: m.header.stamp.sec == sec)
        assert points is not None, 'instances without labeled_points'
        return answered, points

    def publish_until_log(self, index, frame, pattern, depth_msg=None, period=2.0):
        """Publish a frame until the node logs pattern (images may overtake clouds); return the match."""
        for _ in range(int(TIMEOUT / period)):
            self.publish_frame(index, frame, depth_msg)
            if self.process.wait_for_log(pattern, timeout=period):
                break
        return self.process.wait_for_log(pattern, timeout=1.0)

    def wait_diagnostics(self, predicate, timeout=TIMEOUT):
        """Wait for a report of this node whose values satisfy predicate; return its values or None."""
        def matches(msg):
            values = diagnostic_values(msg, STATUS_NAME)
            return values is not None and values['node'] == f'{self.namespace}/ldmseg' and predicate(values)
        msg = self.diagnostics.wait_for(matches, timeout=timeout, start=self.diagnostics.count())
        return diagnostic_values(msg, STATUS_NAME) if msg is not None else None

    def close(self):
        for inbox in (self.instances, self.labeled_points, self.diagnostics):
            self.client.unsubscribe(inbox)
        return self.process.stop()


def start_ldmseg(client, model_dir, log_dir, *params, remaps=(), points_topic='points', inputs=True):
    """Start an ldmseg process in a fresh namespace (reliable QoS unless params say otherwise)."""
    namespace = f'/ldm{next(_namespaces)}'
    args = ['--params-file', str(PARAMS_FILE), '-r', f'__ns:={namespace}', '-p', f'model_path:={model_dir}',
            '-p', 'steps:=2', '-p', 'diagnostics_period:=0.5']
    for param in params:
        args += ['-p', param]
    for remap in remaps:
        args += ['-r', remap]
    process = NodeProcess(MODULE, args, log_dir / f'ldmseg{namespace.replace("/", "_")}.log')
    node = LDMSegUnderTest(client, process, namespace, points_topic, inputs)
    try:
        node.wait_up()
    except AssertionError:
        node.close()
        raise
    return node


RELIABLE_INPUTS = ('qos.image.reliability:=reliable', 'qos.points.reliability:=reliable')


@pytest.fixture(scope='module')
def ldmseg(ros_client, ldmseg_dir, tmp_path_factory):
    node = start_ldmseg(ros_client, ldmseg_dir, tmp_path_factory.mktemp('ldmseg-logs'), *RELIABLE_INPUTS,
                        'max_time_difference:=0.5')
    yield node
    node.close()


@pytest.fixture
def start(ros_client, ldmseg_dir, tmp_path):
    nodes = []

    def launch(*params, **kwargs):
        nodes.append(start_ldmseg(ros_client, ldmseg_dir, tmp_path, *params, **kwargs))
        return nodes[-1]
    yield launch
    for node in nodes:
        node.close()


def check_outputs(instances, points, header, truth_xyz):
    """Instances mono16 with the source header; labeled_points = the frame's depth lifted with those ids."""
    assert instances.header == header and points.header == header
    assert (instances.encoding, instances.width, instances.height) == ('mono16', WIDTH, HEIGHT)
    ids = image_msg_to_numpy(instances)
    assert (points.height, points.width) == (HEIGHT, WIDTH)
    xyz, labels = cloud_arrays(points)
    np.testing.assert_array_equal(labels, ids)
    np.testing.assert_allclose(xyz, truth_xyz, rtol=1e-6, atol=1e-6)   # NaN where the depth is invalid
    return ids


# --- one shared node ------------------------------------------------------------------------------------
def test_completes_the_synthworld_labelled_cloud(ldmseg, sequence):
    frame = sequence[0]
    ldmseg.points_pub.publish(truth_cloud(frame, make_header(10)))
    instances, points = ldmseg.complete(10, frame)
    xyz = depth_to_points(frame.depth, frame.K).astype(np.float32)
    ids = check_outputs(instances, points, make_header(10), xyz)
    truth = frame.instances
    np.testing.assert_array_equal(ids[truth != 0], truth[truth != 0])   # known pixels keep the cloud's ids
    new = set(np.unique(ids)) - set(np.unique(truth))
    assert all(i > truth.max() for i in new), 'segments the model adds get fresh ids above the input ones'


def test_16uc1_millimetre_depth(ldmseg, sequence):
    frame = sequence[1]
    millimetres = np.where(np.isfinite(frame.depth), np.round(frame.depth * 1000), 0).astype(np.uint16)
    millimetres[:4] = 0                                                  # no return: invalid
    ldmseg.points_pub.publish(truth_cloud(frame, make_header(20)))
    instances, points = ldmseg.complete(20, frame, numpy_to_image_msg(millimetres, '16UC1'))
    metres = np.where(millimetres > 0, millimetres / 1000.0, np.nan)
    check_outputs(instances, points, make_header(20), depth_to_points(metres, frame.K).astype(np.float32))
    assert np.isnan(cloud_arrays(points)[0][:4]).all()


def raw_cloud(layout_fields, point_step, width, height, row_step, data_size):
    return PointCloud2(header=make_header(0), fields=layout_fields, point_step=point_step, width=width,
                       height=height, row_step=row_step, data=bytes(data_size))


def fields(label_type=PointField.UINT32, label_name='label'):
    xyz = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
           for i, n in enumerate('xyz')]
    return xyz + [PointField(name=label_name, offset=12, datatype=label_type, count=1)]


BAD_CLOUDS = {
    'missing label field': (raw_cloud(fields(label_name='id'), 16, 4, 1, 64, 64),
                            r"cloud has no field 'label' \(fields: x, y, z, id\)"),
    'float label field': (raw_cloud(fields(label_type=7), 16, 4, 1, 64, 64),
                          r"label field 'label' must be an integer type"),
    'short data': (raw_cloud(fields(), 16, 4, 2, 64, 100),
                   r'data has 100 bytes, expected height x row_step = 2 x 64 = 128'),
    'row_step too small': (raw_cloud(fields(), 16, 4, 1, 32, 32),
                           r'row_step 32 is smaller than width x point_step'),
    'empty cloud': (raw_cloud(fields(), 16, 0, 0, 0, 0), r'empty cloud: 0x0 points'),
}


@pytest.mark.parametrize('case', sorted(BAD_CLOUDS))
def test_bad_cloud_is_refused_and_later_input_served(ldmseg, sequence, case):
    msg, pattern = BAD_CLOUDS[case]
    before = int(ldmseg.wait_diagnostics(lambda v: True)['clouds rejected'])
    ldmseg.points_pub.publish(msg)
    line = ldmseg.process.wait_for_log(rf'\[ERROR\].*bad cloud on {ldmseg.namespace}/points: {pattern}')
    assert line, f'no clear error for {case}; log:\n{ldmseg.process.log}'
    values = ldmseg.wait_diagnostics(lambda v: int(v['clouds rejected']) > before)
    assert values is not None and values['level'] == ERROR and 'bad cloud' in values['last error']
    index = 100 + 10 * sorted(BAD_CLOUDS).index(case)
    ldmseg.points_pub.publish(truth_cloud(sequence[2], make_header(index)))
    instances, _ = ldmseg.complete(index, sequence[2])
    truth = sequence[2].instances
    np.testing.assert_array_equal(image_msg_to_numpy(instances)[truth != 0], truth[truth != 0])
    assert ldmseg.wait_diagnostics(lambda v: v['level'] != ERROR) is not None, 'ERROR level did not clear'


BAD_DEPTH = {
    'colour depth': (numpy_to_image_msg(np.zeros((HEIGHT, WIDTH, 3), np.uint8), 'rgb8'),
                     r'bad depth on /ldm\d+/depth: unsupported depth encoding .rgb8. \(REP-118'),
    'depth of another size': (numpy_to_image_msg(np.ones((HEIGHT // 2, WIDTH // 2), np.float32), '32FC1'),
                              rf'depth image is {WIDTH // 2}x{HEIGHT // 2} but the image is '
                              rf'{WIDTH}x{HEIGHT}'),
}


@pytest.mark.parametrize('case', sorted(BAD_DEPTH))
def test_bad_depth_is_refused_and_later_input_served(ldmseg, sequence, case):
    msg, pattern = BAD_DEPTH[case]
    index = 200 + 10 * sorted(BAD_DEPTH).index(case)
    ldmseg.points_pub.publish(truth_cloud(sequence[0], make_header(index)))
    assert ldmseg.publish_until_log(index, sequence[0], r'\[ERROR\].*' + pattern, msg), ldmseg.process.log
    ldmseg.points_pub.publish(truth_cloud(sequence[0], make_header(index + 1)))
    assert ldmseg.complete(index + 1, sequence[0])[0] is not None


def test_ids_beyond_mono16_fail_the_frame_clearly(ldmseg, sequence):
    frame = sequence[3]
    header = make_header(300)
    cloud = labelled_cloud_msg(depth_to_points(frame.depth, frame.K).astype(np.float32),
                               np.where(frame.instances > 0, frame.instances + 70000, 0), header)
    ldmseg.points_pub.publish(cloud)
    error = r'\[ERROR\].*instance id 700\d\d does not fit ~/instances \(mono16, ids up to 65535\)'
    assert ldmseg.publish_until_log(300, frame, error), ldmseg.process.log
    ldmseg.points_pub.publish(truth_cloud(frame, make_header(301)))
    assert ldmseg.complete(301, frame)[0] is not None
    assert not any(m.header.stamp.sec == header.stamp.sec for m in list(ldmseg.instances.messages))


# --- nodes of their own ------------------------------------------------------------------------------------
@pytest.mark.parametrize('param, code, message', [
    ('cloud_to_camera:=[1.0,0.0]', 2,
     r'invalid parameter: cloud_to_camera must be 16 finite floats \(row-major 4x4\), got 2 value\(s\)'),
    ('model_path:=/nonexistent/ldmseg', 3,
     r'cannot load model: LDMSeg folder /nonexistent/ldmseg is incomplete; '
     r'missing: folder /nonexistent/ldmseg'),
])
def test_bad_start_is_one_clear_error(ros_env, tmp_path, param, code, message):
    process = NodeProcess(MODULE, ['--params-file', str(PARAMS_FILE), '-p', param], tmp_path / 'bad.log')
    assert process.wait_exit() == code, process.log
    assert process.wait_for_log(message, timeout=1.0) and 'Traceback' not in process.log, process.log
    process.stop()


def test_synth_camera_cloud_completed(ros_client, start, tmp_path):
    """The SynthWorld camera and the node as two processes, default (best-effort) subscriptions."""
    camera_ns = f'/cam{next(_namespaces)}'
    kinds = {'image': Image, 'points': PointCloud2, 'instances': Image}
    camera = {name: ros_client.subscribe(kind, f'{camera_ns}/camera/{name}') for name, kind in kinds.items()}
    process = NodeProcess('diffseg_ros.ros.synth_camera',
                          ['-r', f'__ns:={camera_ns}', '-p', f'width:={WIDTH}', '-p', f'height:={HEIGHT}',
                           '-p', 'rate:=2.0', '-p', 'scenes:=1', '-p', 'frames_per_scene:=60',
                           '-p', 'seed:=5'],
                          tmp_path / 'synth_camera.log')
    try:
        topics = ('image', 'depth', 'camera_info', 'points')
        remaps = [f'{name}:={camera_ns}/camera/{name}' for name in topics]
        node = start('fill_void:=false', 'resample:=2', 'samples:=2', remaps=remaps, inputs=False)
        answers = wait_until(lambda: node.instances.count() >= 2 and node.labeled_points.count() >= 2)
        assert answers, f'no completed frames; logs:\n{process.log}\n{node.process.log}'
        instances = node.instances.messages[1]
        stamp = instances.header.stamp

        def of_frame(inbox):
            return inbox.wait_for(lambda m: m.header.stamp == stamp)
        image, cloud, truth = (of_frame(camera[name]) for name in ('image', 'points', 'instances'))
        points = of_frame(node.labeled_points)
        ids = check_outputs(instances, points, image.header, cloud_arrays(cloud)[0])
        truth = image_msg_to_numpy(truth)
        seen = set().union(*(np.unique(image_msg_to_numpy(m)) for m in list(camera['instances'].messages)))
        assert set(np.unique(ids)) <= seen and ids.any()
        # The node pairs the image with the closest cloud it has: this frame's or, if that one came later
        # than the image, the previous one (the camera moved a little in between).
        assert (ids[truth != 0] == truth[truth != 0]).mean() > 0.7
        settings = node.wait_diagnostics(lambda v: True)
        assert (settings['fill void'], settings['resample'], settings['samples']) == ('False', '2', '2')
    finally:
        process.stop()
        for inbox in camera.values():
            ros_client.unsubscribe(inbox)


def id_scores(ids, truth):
    """Return (consistency, coverage) on truth objects: right ids among labelled, right ids among all."""
    objects = truth != 0
    labelled = objects & (ids != 0)
    right = ids == truth
    consistency = right[labelled].mean() if labelled.any() else 0.0
    return round(float(consistency), 3), round(float(right[objects].mean()), 3)


def check_known_and_ids(ids, sparse, fed_ids):
    """Pixels the cloud labelled keep its ids; other ids are fresh (above every id fed in)."""
    np.testing.assert_array_equal(ids[sparse != 0], sparse[sparse != 0])
    assert all(i > max(fed_ids) for i in set(np.unique(ids)) - set(fed_ids) - {0})


def test_feedback_through_a_transform_keeps_ids_on_a_moving_camera(start, sequence):
    """Each frame's labeled_points, moved into the next camera pose, are the next frame's points.

    The test does what tf2 would do on a robot (the node itself only has the static cloud_to_camera):
    it maps the cloud of frame k-1 into the camera of frame k with SynthWorld's known poses. Frame 0 is
    seeded with the camera's truth cloud; ids must stay the truth ids frame after frame.
    """
    node = start(*RELIABLE_INPUTS, 'max_time_difference:=1.5')   # frame k may use frame k-1's cloud only
    first = sequence[0]
    node.points_pub.publish(truth_cloud(first, make_header(-1)))
    fed_ids = set(np.unique(first.instances))
    _, points = node.complete(0, first)
    scores = []
    for k, frame in enumerate(sequence[1:], start=1):
        xyz, labels = cloud_arrays(points)
        moved = transform_points(xyz, invert_pose(frame.pose) @ sequence[k - 1].pose).astype(np.float32)
        node.points_pub.publish(labelled_cloud_msg(moved, labels, points.header))
        instances, points = node.complete(k, frame)
        ids = image_msg_to_numpy(instances)
        check_known_and_ids(ids, project_labels(moved, labels, frame.K, WIDTH, HEIGHT), fed_ids)
        scores.append(id_scores(ids, frame.instances))
    print('\nwith the camera motion: id consistency, coverage per frame', scores)
    assert all(consistency >= 0.95 for consistency, _ in scores), scores
    assert all(coverage >= 0.5 for _, coverage in scores), scores   # a random model fills no holes


def test_remapped_feedback_the_node_reads_its_own_labeled_points(start, sequence):
    """`points:=ldmseg/labeled_points`: the node waits for a seed, then completes from its own results."""
    node = start(*RELIABLE_INPUTS, 'max_time_difference:=1.5', remaps=['points:=ldmseg/labeled_points'],
                 points_topic='ldmseg/labeled_points')
    node.publish_frame(0, sequence[0])
    waiting = node.wait_diagnostics(lambda v: int(v['frames waiting']) >= 1)
    expected = f'waiting for points on {node.namespace}/ldmseg/labeled_points'
    assert waiting is not None and waiting['waiting for'] == expected, waiting
    assert (waiting['fill void'], waiting['resample'], waiting['samples']) == ('True', '1', '1')  # defaults
    assert node.process.wait_for_log('nothing published for this image: waiting for points')
    assert node.instances.count() == 0
    node.points_pub.publish(truth_cloud(sequence[0], make_header(-1)))   # the seed
    fed_ids = set(np.unique(sequence[0].instances))
    _, points = node.complete(0, sequence[0])
    scores = []
    for k, frame in enumerate(sequence[1:4], start=1):
        xyz, labels = cloud_arrays(points)   # what the node received from itself
        instances, points = node.complete(k, frame)
        ids = image_msg_to_numpy(instances)
        check_known_and_ids(ids, project_labels(xyz, labels, frame.K, WIDTH, HEIGHT), fed_ids)
        scores.append(id_scores(ids, frame.instances))
    # Without the camera motion the labels stay where they were in the image: ids persist, masks lag.
    print('\nwithout the camera motion: id consistency, coverage per frame', scores)


def test_compressed_images_are_completed(start, sequence, ros_client):
    node = start(*RELIABLE_INPUTS, 'image_transport:=compressed', inputs=False)
    assert node.process.wait_for_log(rf'{node.namespace}/image/compressed')
    pubs = {name: ros_client.publisher(kind, f'{node.namespace}/{name}') for name, kind in (
        ('image/compressed', CompressedImage), ('depth', Image), ('camera_info', CameraInfo),
        ('points', PointCloud2))}
    assert all(ros_client.wait_for_subscribers(pub) for pub in pubs.values())
    frame, header = sequence[0], make_header(900)

    def publish():
        pubs['points'].publish(truth_cloud(frame, header))
        pubs['camera_info'].publish(camera_info_msg(frame.K, WIDTH, HEIGHT, header))
        pubs['image/compressed'].publish(compressed_image_msg(frame.rgb, 'png', header))
        pubs['depth'].publish(numpy_to_image_msg(frame.depth.astype(np.float32), '32FC1', header))
        return node.instances.wait_for(lambda m: m.header == header, timeout=2.0)
    answer = wait_until(publish, period=0.0)
    assert answer is not None, node.process.log
    assert (answer.encoding, answer.width, answer.height) == ('mono16', WIDTH, HEIGHT)
