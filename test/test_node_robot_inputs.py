"""Inputs robots send, over real DDS: compressed images (JPEG, PNG, corrupt), a query latched before start."""
import json
import time

from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from diffseg_ros.ros.image_codec import compressed_image_msg, image_msg_to_numpy
from ros_harness import LATCHED, make_header, make_image, pattern_image, wait_until


def send_compressed_until_answered(node, kind, first_index):
    """Publish compressed frames until ~/semantic answers one; return (answer, {stamp sec: header sent})."""
    sent, index = {}, [first_index]

    def next_frame():
        header = make_header(index[0])
        index[0] += 1
        sent[header.stamp.sec] = header
        return compressed_image_msg(pattern_image(64, 48, seed=index[0]), kind, header)
    inbox = node.outputs['semantic']
    start = inbox.count()
    answer = node.publish_until(node.image_pub, next_frame, lambda: inbox.wait_for(
        lambda m: m.header.stamp.sec in sent, timeout=0.1, start=start), period=0.5)
    return answer, sent


def test_compressed_jpeg_and_png_are_segmented_and_corrupt_data_refused(launcher):
    node = launcher.start(transport='compressed')
    assert node.image_pub.topic_name == f'{node.namespace}/image/compressed'
    assert node.process.wait_for_log(f'segmenting {node.namespace}/image/compressed for the phrases')
    assert node.send_query('red mug; blue bottle', expect=['red mug', 'blue bottle']) is not None
    for kind, first in (('jpeg', 100), ('png', 200)):
        answer, sent = send_compressed_until_answered(node, kind, first)
        assert answer is not None, f'no answer to {kind} frames; log:\n{node.process.log}'
        assert answer.header == sent[answer.header.stamp.sec]
        assert image_msg_to_numpy(answer).shape == (48, 64)
    jpeg = compressed_image_msg(pattern_image(64, 48), 'jpeg', make_header(300))
    corrupt = CompressedImage(header=make_header(301), format='jpeg', data=bytes(jpeg.data)[:40])
    before = int(node.wait_diagnostics(lambda v: True)['frames rejected'])
    assert node.publish_until(node.image_pub, lambda: corrupt, lambda: node.process.wait_for_log(
        r'\[ERROR\].*bad image on /t\d+/image/compressed: corrupt JPEG data \(40 bytes\)', timeout=1.0))
    assert node.wait_diagnostics(lambda v: int(v['frames rejected']) > before) is not None
    garbage = CompressedImage(header=make_header(302), format='jpeg', data=b'not an image at all')
    assert node.publish_until(node.image_pub, lambda: garbage, lambda: node.process.wait_for_log(
        r'\[ERROR\].*compressed image is neither JPEG nor PNG', timeout=1.0))
    answer, _ = send_compressed_until_answered(node, 'png', 400)
    assert answer is not None and node.process.running, 'node did not keep serving after corrupt data'


def test_query_latched_before_the_node_starts_reaches_it(launcher, ros_client):
    namespace = '/latched_before_start'
    publisher = ros_client.publisher(String, f'{namespace}/query', LATCHED)
    publisher.publish(String(data='red mug'))
    node = launcher.start(namespace=namespace)
    state = node.state.wait_for(lambda m: json.loads(m.data)['queries'])
    assert state is not None, f'the latched query never reached the node; log:\n{node.process.log}'
    assert [q['text'] for q in json.loads(state.data)['queries']] == ['red mug']
    # A volatile publisher (`ros2 topic pub --once`) still matches the transient-local subscription.
    assert node.send_query('blue bottle', expect=['blue bottle']) is not None
    assert wait_until(lambda: publisher.get_subscription_count() >= 1)


def test_bad_values_over_the_node(launcher, ros_client):
    """Refuse bad stamps, quote a 1 MB learn request short, log a flood once, warn about unknown concepts."""
    node = launcher.start()
    assignments = ros_client.subscribe(String, node.topic('diffseg/assignments'))
    learn_status = ros_client.subscribe(String, node.topic('diffseg/learn_status'), LATCHED)
    state = node.send_query('my mug; red bottle', expect=['my mug', 'red bottle'])
    assert state is not None and state['warnings'] == [
        "'my mug' names no loaded concept (loaded: none); read as plain text"]

    bad_stamp = make_image(50)
    bad_stamp.header.stamp.nanosec = 4294967295
    assert node.publish_until(node.image_pub, lambda: bad_stamp, lambda: node.process.wait_for_log(
        r'\[ERROR\].*bad image on /t\d+/image: invalid stamp sec=1050 nanosec=4294967295', timeout=1.0))
    answer, _ = node.send_images_until(node.outputs['semantic'], first_index=60)
    assert answer is not None
    assert assignments.wait_for(lambda m: json.loads(m.data)['header']['stamp']['sec'] >= 1060) is not None
    assert all(json.loads(m.data)['header']['stamp']['nanosec'] < 10**9 for m in assignments.messages)

    learn_pub = ros_client.publisher(String, node.topic('diffseg/learn'))
    assert ros_client.wait_for_subscribers(learn_pub)
    learn_pub.publish(String(data='my mug = mug; ' * 80_000))   # about 1 MB
    status = learn_status.wait_for(lambda m: json.loads(m.data)['state'] == 'failed')
    assert status is not None and len(status.data) < 400, status and status.data[:500]
    assert node.wait_diagnostics(lambda v: 'refused' not in v['learn'] and v['learn'].startswith("'my mug"))
    assert max(len(line) for line in node.process.log.splitlines()) < 400

    flood_start = len(node.process.log.splitlines())
    before = int(node.wait_diagnostics(lambda v: True)['frames rejected'])
    for size in range(100, 140):   # 40 bad frames in 2 s, each with other numbers in its error
        node.image_pub.publish(Image(header=make_header(70), encoding='rgb8', width=16, height=16, step=48,
                                     data=bytes(size)))
        time.sleep(0.05)
    assert node.wait_diagnostics(lambda v: int(v['frames rejected']) >= before + 20) is not None
    flood_lines = [line for line in node.process.log.splitlines()[flood_start:] if 'image data has' in line]
    assert len(flood_lines) <= 1, flood_lines


def test_compressed_topic_follows_the_remapped_image_topic(launcher):
    process, _ = launcher.start_process('image_transport:=compressed', remaps=['image:=/robot/color'])
    assert process.wait_for_log(r'ready: segmenting /robot/color/compressed for the phrases'), process.log
