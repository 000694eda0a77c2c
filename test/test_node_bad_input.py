"""Bad messages reach the diffseg node over DDS: each is logged once, counted, reported, and survived."""
import time

from diagnostic_msgs.msg import DiagnosticStatus
import pytest
from sensor_msgs.msg import Image
from std_msgs.msg import String

from ros_harness import make_header, make_image

ERROR = int.from_bytes(DiagnosticStatus.ERROR, 'little')


@pytest.fixture(scope='module')
def diffseg(module_launcher):
    node = module_launcher.start()
    assert node.send_query('red mug; blue bottle', expect=['red mug', 'blue bottle']) is not None
    return node


def raw_image(index, encoding, width, height, step, data_size):
    return Image(header=make_header(index), encoding=encoding, width=width, height=height, step=step,
                 data=bytes(data_size))


BAD_IMAGES = {
    'unsupported encoding': (raw_image(1, 'yuv422', 4, 4, 8, 32), r"unsupported image encoding 'yuv422'"),
    'zero size': (raw_image(2, 'rgb8', 0, 0, 0, 0), r'empty image: 0x0 pixels'),
    'short data': (raw_image(3, 'rgb8', 16, 16, 48, 100), r'image data has 100 bytes, expected .* = 768'),
    'step too small': (raw_image(4, 'rgb8', 16, 16, 40, 640), r'step 40 is smaller than width x pixel size'),
    'odd step': (raw_image(5, 'mono16', 16, 16, 33, 33 * 16), r'step 33 is not a multiple of the 2-byte'),
    'depth image': (raw_image(6, '32FC1', 16, 16, 64, 64 * 16),
                    r"cannot convert image encoding '32FC1' to RGB"),
}


@pytest.mark.parametrize('case', sorted(BAD_IMAGES))
def test_bad_image_is_reported_and_next_frame_served(diffseg, case):
    msg, pattern = BAD_IMAGES[case]
    values = diffseg.wait_diagnostics(lambda v: True)
    rejected_before = int(values['frames rejected'])
    # Best effort: resend until it arrives (repeats must not repeat the log line).
    line = diffseg.publish_until(diffseg.image_pub, lambda: msg, lambda: diffseg.process.wait_for_log(
        r'\[ERROR\].*bad image on /t\d+/image: .*' + pattern, timeout=1.0))
    assert line, f'no clear log line for {case}; log:\n{diffseg.process.log}'
    values = diffseg.wait_diagnostics(lambda v: int(v['frames rejected']) > rejected_before)
    assert values is not None and values['level'] == ERROR
    assert 'bad image' in values['last error'] and 'bad image' in values['message']
    output, sent = diffseg.send_images_until(diffseg.outputs['semantic'], first_index=1000 + 100 * len(case))
    assert output is not None and output.header == sent[output.header.stamp.sec], 'next good frame not served'
    assert diffseg.wait_diagnostics(lambda v: v['level'] != ERROR) is not None, 'ERROR level did not clear'


def test_repeated_bad_frames_log_once_but_are_all_counted(diffseg):
    msg = raw_image(7, 'nv12', 8, 8, 8, 96)
    # A line of this kind may have been logged less than a period ago: publish until one shows.
    assert diffseg.publish_until(diffseg.image_pub, lambda: msg, lambda: diffseg.process.wait_for_log(
        "unsupported image encoding 'nv12'", timeout=1.0), period=0.5)
    before = int(diffseg.wait_diagnostics(lambda v: True)['frames rejected'])
    for _ in range(10):
        diffseg.image_pub.publish(msg)
        time.sleep(0.1)   # a slow stream: the subscription's history depth is not what is tested
    assert diffseg.process.wait_for_log("unsupported image encoding 'nv12'")
    values = diffseg.wait_diagnostics(lambda v: int(v['frames rejected']) >= before + 8)
    assert values is not None, 'rejected frames were not counted'
    assert diffseg.process.log.count("unsupported image encoding 'nv12'") == 1


def test_oversized_query_is_refused_and_queries_kept(diffseg):
    state_count = diffseg.state.count()
    diffseg.query_pub.publish(String(data='mug; ' * 2100))   # 10.5 kB
    assert diffseg.process.wait_for_log(r'\[ERROR\].*query refused: query message of 10500 bytes refused '
                                        r'\(limit 10240 bytes\)'), diffseg.process.log
    values = diffseg.wait_diagnostics(lambda v: 'query refused' in v['last error'])
    assert values is not None and int(values['queries rejected']) >= 1
    assert values['queries'] == 'red mug; blue bottle'
    assert diffseg.state.count() == state_count   # the confirmed state did not change
    output, sent = diffseg.send_images_until(diffseg.outputs['semantic'], first_index=5000)
    assert output is not None, 'frames no longer served after a refused query'


def test_tiny_image_fails_in_engine_and_node_recovers(diffseg):
    msg = make_image(6000, width=4, height=4)
    diffseg.image_pub.publish(msg)
    values = diffseg.wait_diagnostics(lambda v: int(v['frames failed']) >= 1)
    assert values is not None and values['level'] == ERROR and 'segmentation failed' in values['last error']
    assert diffseg.process.wait_for_log(r'\[ERROR\].*segmentation failed: ValueError: image too small')
    output, _ = diffseg.send_images_until(diffseg.outputs['semantic'], first_index=6001)
    assert output is not None
